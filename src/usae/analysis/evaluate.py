"""``usae eval``: cross-model R², universality metrics, top images and plots, streamed.

Memory is bounded by one batch: codes stay sparse (values, indices), concept statistics are
(M, n) accumulators, and top images are merged per batch into (n, T) tables.

Definitions (τ = ``threshold``, default 0.1 as in the reference):
- fire of concept k in model m: a token with z_k^m > τ; co-fire: every model's z_k > τ
- energy_k = Σ_m ‖mean_x z_k^m(x) · D_k^m‖₂ with the normalized dictionary
- firing entropy FE_k = −Σ_m p log p / log M with p = fires_k^m / Σ_j fires_k^j (0 log 0 = 0)
- co-fire proportion CFP_k^m = cofires_k / fires_k^m
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from usae.analysis.controls import independent_consistency
from usae.analysis.eval_folder import REPORT_FILE, EvalReport, run_identity, write_report
from usae.analysis.metrics import JaccardAccumulator, R2Accumulator, cross_model_update
from usae.analysis.plots import make_plots
from usae.errors import UsaeError
from usae.files import (
    atomic_save_safetensors,
    atomic_write_text,
    replace_folder,
)
from usae.hub import local_run
from usae.malloc import keep_freed_memory
from usae.options import EvalOptions, merged
from usae.progress import bar as progress_bar
from usae.sae import run as run_folder
from usae.sae.model import UniversalSAE
from usae.store.store import Store

log = logging.getLogger(__name__)
UNIVERSAL_FE = 0.85  # FE at or above: fires about equally in every model
SPECIFIC_FE = 0.2  # FE at or below: fires (almost) only in one model


class ConceptAccumulator:
    """Per-model, per-concept sums over tokens: fires, co-fires, code sums, activity."""

    def __init__(self, models: tuple[str, ...], n: int, threshold: float, top: int) -> None:
        m = len(models)
        self.models, self.n, self.threshold, self.top = models, n, threshold, top
        self.fires = torch.zeros(m, n, dtype=torch.float64)
        self.active = torch.zeros(m, n, dtype=torch.float64)
        self.code_sum = torch.zeros(m, n, dtype=torch.float64)
        self.cofires = torch.zeros(n, dtype=torch.float64)
        self.l0_sum = torch.zeros(m, dtype=torch.float64)
        self.jaccard = JaccardAccumulator(models)
        self.tokens = 0
        # top images: score = mean activation over the image's tokens
        self.top_rows = {key: torch.full((n, 0), -1, dtype=torch.long)
                         for key in ("mean", *models)}
        self.top_scores = {key: torch.zeros(n, 0) for key in ("mean", *models)}

    def update(self, codes: dict[str, tuple[Tensor, Tensor]], rows: Tensor, tokens: int) -> None:
        """``codes[m] = (values_nk, indices_nk)`` for N = len(rows) * tokens aligned tokens.

        Everything stays sparse: co-fires are (token, concept) keys present in every model,
        per-image means are index_add over those keys."""
        n_tok = next(iter(codes.values()))[0].shape[0]
        n_img = len(rows)
        token_of = torch.arange(n_tok).unsqueeze(1)
        image_of = (token_of // tokens) * self.n
        fired_keys, per_image = [], {}
        for j, m in enumerate(self.models):
            vals, idx = codes[m]
            vals, idx = vals.double().cpu(), idx.cpu()
            fired = vals > self.threshold
            ones = torch.ones(int(fired.sum()), dtype=torch.float64)
            self.fires[j].index_add_(0, idx[fired], ones)
            pos = vals > 0
            self.active[j].index_add_(0, idx[pos], torch.ones(int(pos.sum()), dtype=torch.float64))
            self.code_sum[j].index_add_(0, idx.flatten(), vals.flatten())
            self.l0_sum[j] += float(pos.sum())
            fired_keys.append((token_of * self.n + idx)[fired])
            sums = torch.zeros(n_img * self.n, dtype=torch.float64)
            sums.index_add_(0, (image_of + idx).flatten(), vals.flatten())
            per_image[m] = (sums.view(n_img, self.n) / tokens).float()  # (B, n)
        self.jaccard.update(codes)
        keys, counts = torch.unique(torch.cat(fired_keys), return_counts=True)
        full = keys[counts == len(self.models)] % self.n
        self.cofires.index_add_(0, full, torch.ones(len(full), dtype=torch.float64))
        self.tokens += n_tok
        per_image["mean"] = torch.stack([per_image[m] for m in self.models]).mean(0)
        for key, scores in per_image.items():
            self._merge_top(key, scores.T, rows)

    def _merge_top(self, key: str, scores_nb: Tensor, rows: Tensor) -> None:
        all_scores = torch.cat([self.top_scores[key], scores_nb], dim=1)
        all_rows = torch.cat([self.top_rows[key], rows.expand(self.n, -1)], dim=1)
        k = min(self.top, all_scores.shape[1])
        best, pos = torch.topk(all_scores, k, dim=1)
        self.top_scores[key], self.top_rows[key] = best, all_rows.gather(1, pos)


def _entropy(fires_mn: np.ndarray) -> np.ndarray:
    """Normalized firing entropy per concept; NaN where the concept never fires."""
    m = fires_mn.shape[0]
    total = fires_mn.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = fires_mn / total
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        fe = -plogp.sum(0) / math.log(m) if m > 1 else np.zeros_like(total)
    return np.where(total > 0, np.abs(fe), np.nan)  # abs: no "-0.0" for one-model concepts


def eval_rows(store: Store, split: str) -> tuple[np.ndarray, str]:
    """Rows of ``split``; without a ``val`` split, every image (with a warning)."""
    if split == "val" and "val" not in store.splits():
        log.warning("warning: the store has no 'val' split; evaluating on every image")
        return store.rows("all"), "all"
    return store.rows(split), split


@torch.no_grad()
def evaluate(run: str | Path, store_path: str | Path, out: str | Path,
             options: EvalOptions | None = None, *, progress: bool = True,
             independent: str | Path | None = None, compare: list[str | Path] | None = None,
             force: bool = False, truth: str | Path | None = None,
             **changes: Any) -> EvalReport:
    """Evaluate a run on a store split; write report.json, concepts.csv, top images, plots.

    ``options`` (or keyword ``changes`` such as ``split="all"``): see ``EvalOptions``. The
    output folder is written whole or not at all; a non-empty folder that is not an earlier
    eval is refused unless ``force``. ``compare``: other runs evaluated on the same split,
    their reports in ``out/compare/<i>-<name>/``. ``truth``: a ``usae synth`` folder to score
    the run against (the report's ``truth`` section, ``usae.analysis.truth``).
    """
    o = merged(EvalOptions, options, changes)
    given, run = str(run), local_run(run)
    store = Store(store_path)
    keep_freed_memory(o.device)
    sae = UniversalSAE.load(run, device=o.device)
    run_folder.check_run_matches_store(run, sae.models, sae.cfg.dims, store)
    rows, split_used = eval_rows(store, o.split)
    if truth is not None:
        from usae.analysis.truth import load_truth

        truth = load_truth(truth)  # read once; a wrong --truth fails before the eval's work
    with replace_folder(out, REPORT_FILE, force, what="eval") as tmp:
        stats = _stream(sae, store, rows, o, progress)
        report, concept_rows = _report(sae, stats, o.threshold, split_used, rows)
        # the run's folder name (or hf:// id), never this machine's path: reports get shared
        report["run"] = {**run_identity(run),
                         "path": given if "://" in given else Path(given).name}
        if o.faithfulness:
            from usae.analysis.faithfulness import measure

            report["faithfulness"] = measure(sae, store, rows, o.batch_images, o.device,
                                             o.faithfulness_images, progress)
            report["summary"].update(faithfulness_summary(report["faithfulness"]))
        if truth is not None:
            from usae.analysis.truth import score_truth

            a = _concept_arrays(sae.models, stats)
            report["truth"] = score_truth(sae, store, rows, truth, {
                "specific": a["specific"], "owner": a["owner"], "fires": a["fires"]})
        if independent:
            report["independent"] = independent_consistency(sae, independent)
        if compare:
            report["comparison"] = compare_runs(report, run, compare, store_path, tmp / "compare",
                                                replace(o, split=split_used, plots=False))
        typed = EvalReport(report)
        _write(tmp, typed, concept_rows, stats, sae.models)
        if o.plots:
            make_plots(tmp, typed, concept_rows)
    return typed


def compare_runs(report: dict[str, Any], run: Path, others: list[str | Path],
                 store_path: str | Path, out: Path, options: EvalOptions) -> list[dict[str, Any]]:
    """Evaluate other runs (the shuffled-pairing control, training variants) on the same split,
    each into ``out/<i>-<name>/``; one summary row per run, this run first."""
    rows = [_comparison_row(run, report)]
    for i, other in enumerate(others):
        other = Path(other)
        rep = evaluate(other, store_path, out / f"{i}-{other.name}", options, progress=False)
        rows.append(_comparison_row(other, rep))
    return rows


def faithfulness_summary(section: dict[str, Any] | None) -> dict[str, Any]:
    """Mean KL recovered and top-1 agreement, self (diagonal) and cross (off-diagonal)."""
    if not section or "kl_recovered" not in section:
        return {}
    out = {}
    for key in ("kl_recovered", "top1_agreement"):
        diag = [row[i] for i, row in enumerate(section[key]) if row[i] is not None]
        out[f"{key}_self"] = float(np.mean(diag)) if diag else None
        out[f"{key}_cross"] = _off_mean(section[key])
    return out


def _comparison_row(run: Path, report: dict[str, Any]) -> dict[str, Any]:
    try:
        cfg = run_folder.read_run_json(run)
    except UsaeError:
        cfg = {}
    train = cfg.get("train", {})
    return {"run": run.name, "preset": cfg.get("preset"),
            "shuffle_pairing": train.get("shuffle_pairing"),
            "decoder_update": train.get("decoder_update"), "schedule": train.get("schedule"),
            "standardize": cfg.get("sae", {}).get("standardize"),
            **report["summary"],
            "dead_fraction_mean": float(np.mean(list(report["dead_fraction"].values())))}


def _stream(sae: UniversalSAE, store: Store, rows: np.ndarray, o: EvalOptions,
            progress: bool) -> dict[str, Any]:
    models = sae.models
    r2 = R2Accumulator(models, sae.cfg.dims)
    concepts = ConceptAccumulator(models, sae.cfg.n, o.threshold, o.top_images)
    dicts = {m: sae.normalized_dict(m) for m in models}
    device = sae.device_of()
    bar = progress_bar(total=len(rows), desc="eval", unit="img", disable=not progress)
    for start in range(0, len(rows), o.batch_images):
        batch_rows = rows[start:start + o.batch_images]
        raw = {m: store.read(m, batch_rows).reshape(-1, store.dims[j]).to(device)
               for j, m in enumerate(models)}
        codes = cross_model_update(r2, sae, raw, dicts)
        concepts.update(codes, torch.from_numpy(batch_rows), store.tokens)
        bar.update(len(batch_rows))
    bar.close()
    return {"r2": r2, "concepts": concepts,
            "dict_norms": {m: dicts[m].norm(dim=1).double().cpu() for m in models}}


def _concept_arrays(models: tuple[str, ...], stats: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-concept numbers from the accumulators: fires, energy, entropy, co-fires, classes."""
    c: ConceptAccumulator = stats["concepts"]
    tokens = max(c.tokens, 1)
    fires = c.fires.numpy()
    mean_code = (c.code_sum / tokens).numpy()
    energy_mn = np.stack([np.abs(mean_code[j]) * stats["dict_norms"][m].numpy()
                          for j, m in enumerate(models)])
    fe = _entropy(fires)
    cofires = c.cofires.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        cfp = np.where(fires > 0, cofires[None, :] / np.where(fires > 0, fires, 1), np.nan)
    return {"fires": fires, "energy_mn": energy_mn, "energy": energy_mn.sum(0), "fe": fe,
            "cofires": cofires, "cfp": cfp, "dead": c.active.numpy() == 0,
            "universal": np.nan_to_num(fe, nan=-1) >= UNIVERSAL_FE,
            "specific": (~np.isnan(fe)) & (fe <= SPECIFIC_FE),
            "owner": np.argmax(fires, axis=0)}


def _report(sae: UniversalSAE, stats: dict[str, Any], threshold: float, split: str,
            rows: np.ndarray) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    models = sae.models
    r2: R2Accumulator = stats["r2"]
    c: ConceptAccumulator = stats["concepts"]
    a = _concept_arrays(models, stats)
    tokens = max(c.tokens, 1)
    off = ~np.eye(len(models), dtype=bool)
    r2_mat, fe, jaccard = r2.r2(), a["fe"], c.jaccard.result()
    report = {
        "models": list(models),
        "r2": _round(r2_mat),
        "r2_paper": _round(r2.r2_paper()),
        "mse": _round(r2.mse()),
        "l0": {m: float(c.l0_sum[j] / tokens) for j, m in enumerate(models)},
        "dead_fraction": {m: float(a["dead"][j].mean()) for j, m in enumerate(models)},
        "jaccard": jaccard,
        "n_tokens": int(c.tokens),
        "n_images": int(len(rows)),
        "n_concepts": int(sae.cfg.n),
        "threshold": threshold,
        "split": split,
        "summary": {
            "self_r2_mean": float(np.diag(r2_mat).mean()),
            "cross_r2_mean": float(r2_mat[off].mean()) if off.any() else None,
            "jaccard_cross_mean": _off_mean(jaccard),
            "firing_entropy_median": float(np.nanmedian(fe)) if (~np.isnan(fe)).any() else None,
            "never_fire_fraction": float(np.isnan(fe).mean()),
        },
        "concept_classes": {
            "thresholds": {"universal_fe_at_least": UNIVERSAL_FE,
                           "model_specific_fe_at_most": SPECIFIC_FE},
            "universal": int(a["universal"].sum()),
            "model_specific": {m: int((a["specific"] & (a["owner"] == j)).sum())
                               for j, m in enumerate(models)},
            "never_fire": int(np.isnan(fe).sum()),
        },
    }
    return report, [_concept_row(models, a, k) for k in range(sae.cfg.n)]


def _concept_row(models: tuple[str, ...], a: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """One line of concepts.csv (empty cells for undefined entropies and proportions)."""
    fe, cfp = a["fe"], a["cfp"]
    row: dict[str, Any] = {"concept": k, "energy": float(a["energy"][k]),
                           "firing_entropy": "" if np.isnan(fe[k]) else float(fe[k])}
    for j, m in enumerate(models):
        row[f"fires_{m}"] = int(a["fires"][j, k])
    row["cofires"] = int(a["cofires"][k])
    for j, m in enumerate(models):
        row[f"cofire_proportion_{m}"] = "" if np.isnan(cfp[j, k]) else float(cfp[j, k])
    row["class"] = ("universal" if a["universal"][k] else
                    f"specific:{models[a['owner'][k]]}" if a["specific"][k] else
                    "dead" if np.isnan(fe[k]) else "mixed")
    for j, m in enumerate(models):
        row[f"energy_{m}"] = float(a["energy_mn"][j, k])
    return row


def _off_mean(mat: list[list[float | None]]) -> float | None:
    """Mean of the defined off-diagonal cells (None with one model)."""
    cells = [v for i, row in enumerate(mat) for j, v in enumerate(row) if i != j and v is not None]
    return float(np.mean(cells)) if cells else None


def _round(a: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def _write(out: Path, report: EvalReport, concept_rows: list[dict[str, Any]],
           stats: dict[str, Any], models: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(concept_rows[0]))
    writer.writeheader()
    writer.writerows(concept_rows)
    atomic_write_text(out / "concepts.csv", buf.getvalue())
    c: ConceptAccumulator = stats["concepts"]
    tensors = {}
    for key in ("mean", *models):
        tensors[f"rows.{key}"] = c.top_rows[key].contiguous()
        tensors[f"scores.{key}"] = c.top_scores[key].float().contiguous()
    atomic_save_safetensors(out / "top_images.safetensors", tensors)
