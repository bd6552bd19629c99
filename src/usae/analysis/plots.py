"""Plots for ``usae eval`` (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from usae.analysis.eval_folder import EvalReport

# The look of every plot, in one place (sizes in inches; colours of Paul Tol's bright scheme).
STYLE = {
    "dpi": 110, "cmap": "viridis", "dark_below": 0.6, "cell_fontsize": 11, "tick_rotation": 30,
    "colorbar_shrink": 0.8, "bins": 25, "hist": "#4477aa", "universal": "#228833",
    "specific": "#cc6677", "fit": "#cc6677", "points": "#4477aa", "point_size": 6,
    "point_alpha": 0.5, "fit_points": 50, "legend_fontsize": 8, "line_width": 1,
    "models": ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"],
    "size_r2": (1.6, 1.1, 1.2, 1.0),  # width = a + b x models, height = c + d x models
    "size_hist": (5.5, 3.6), "size_scatter": (5.5, 4), "size_rank": (5.5, 3.6),
    "size_bars": (7.5, 3.2),
}


def make_plots(out: Path, report: EvalReport, concepts: list[dict[str, Any]]) -> list[Path]:
    """Write the eval's PNG plots into ``out``; none when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for name, draw in (("r2_matrix.png", _r2_matrix), ("firing_entropy.png", _firing_entropy),
                       ("cofires_vs_energy.png", _cofires_vs_energy),
                       ("cofire_proportion_by_rank.png", _cofire_proportion),
                       ("dead_and_l0.png", _dead_and_l0)):
        fig = draw(plt, report, concepts)
        fig.tight_layout()
        fig.savefig(out / name, dpi=STYLE["dpi"])
        plt.close(fig)
        paths.append(out / name)
    return paths


def _r2_matrix(plt, report: EvalReport, concepts: list[dict[str, Any]]):
    models = report.models
    r2 = np.asarray(report.r2)
    a, b, c, d = STYLE["size_r2"]
    fig, ax = plt.subplots(figsize=(a + b * len(models), c + d * len(models)))
    im = ax.imshow(r2, vmin=min(0.0, r2.min()), vmax=1.0, cmap=STYLE["cmap"])
    for i in range(len(models)):
        for j in range(len(models)):
            ax.text(j, i, f"{r2[i, j]:.2f}", ha="center", va="center",
                    color="white" if r2[i, j] < STYLE["dark_below"] else "black",
                    fontsize=STYLE["cell_fontsize"])
    ax.set_xticks(range(len(models)), models, rotation=STYLE["tick_rotation"], ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("decoded into")
    ax.set_ylabel("encoded from")
    ax.set_title(f"R² on {report.split} ({report['n_tokens']:,} tokens)")
    fig.colorbar(im, ax=ax, shrink=STYLE["colorbar_shrink"])
    return fig


def _firing_entropy(plt, report: EvalReport, concepts: list[dict[str, Any]]):
    fe = np.array([float(c["firing_entropy"]) for c in concepts if c["firing_entropy"] != ""])
    limits = report.concept_classes["thresholds"]  # the eval's own class boundaries
    universal, specific = limits["universal_fe_at_least"], limits["model_specific_fe_at_most"]
    fig, ax = plt.subplots(figsize=STYLE["size_hist"])
    ax.hist(fe, bins=np.linspace(0, 1, STYLE["bins"] + 1), color=STYLE["hist"],
            edgecolor="white")
    ax.axvline(universal, color=STYLE["universal"], ls="--", label=f"universal ≥ {universal}")
    ax.axvline(specific, color=STYLE["specific"], ls="--", label=f"model-specific ≤ {specific}")
    ax.set_xlabel("firing entropy (0: one model, 1: all models equally)")
    ax.set_ylabel("concepts")
    ax.set_title(f"Firing entropy ({len(fe)} firing concepts of {len(concepts)})")
    ax.legend(fontsize=STYLE["legend_fontsize"])
    return fig


def _cofires_vs_energy(plt, report: EvalReport, concepts: list[dict[str, Any]]):
    energy = np.array([float(c["energy"]) for c in concepts])
    cof = np.array([float(c["cofires"]) for c in concepts])
    ok = (energy > 0) & (cof > 0)
    fig, ax = plt.subplots(figsize=STYLE["size_scatter"])
    x, y = np.log10(cof[ok]), np.log10(energy[ok])
    if ok.sum() >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        corr = float(np.corrcoef(x, y)[0, 1])
        ax.scatter(cof[ok], energy[ok], s=STYLE["point_size"], alpha=STYLE["point_alpha"],
                   color=STYLE["points"])
        xs = np.linspace(x.min(), x.max(), STYLE["fit_points"])
        ax.plot(10 ** xs, 10 ** (slope * xs + intercept), color=STYLE["fit"],
                label=f"slope {slope:.2f}, r = {corr:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "too few co-firing concepts to fit", ha="center", transform=ax.transAxes)
    ax.set_xlabel("co-fires (tokens where every model fires)")
    ax.set_ylabel("energy")
    ax.set_title("Co-fires vs energy")
    return fig


def _cofire_proportion(plt, report: EvalReport, concepts: list[dict[str, Any]]):
    energy = np.array([float(c["energy"]) for c in concepts])
    fig, ax = plt.subplots(figsize=STYLE["size_rank"])
    order = np.argsort(-energy)
    for m in report.models:
        vals = np.array([float(concepts[k][f"cofire_proportion_{m}"] or "nan") for k in order])
        ax.plot(np.arange(1, len(vals) + 1), vals, lw=STYLE["line_width"], label=m)
    ax.set_xscale("log")
    ax.set_xlabel("concept rank by energy")
    ax.set_ylabel("co-fire proportion")
    ax.set_title("Co-fire proportion by concept rank")
    ax.legend(fontsize=STYLE["legend_fontsize"])
    return fig


def _dead_and_l0(plt, report: EvalReport, concepts: list[dict[str, Any]]):
    models = report.models
    fig, axes = plt.subplots(1, 2, figsize=STYLE["size_bars"])
    palette = STYLE["models"]
    colors = [palette[i % len(palette)] for i in range(len(models))]
    axes[0].bar(models, [report.dead_fraction[m] for m in models], color=colors)
    axes[0].set_title("dead fraction")
    axes[0].set_ylim(0, 1)
    axes[1].bar(models, [report.l0[m] for m in models], color=colors)
    axes[1].set_title("L0 (active concepts / token)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=STYLE["tick_rotation"])
    return fig
