"""usae eval's plots (usae.analysis.plots): what each figure shows, read back from the
matplotlib objects and compared with the report and the concept rows written here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from usae.analysis import plots  # noqa: E402
from usae.analysis.eval_folder import EvalReport  # noqa: E402

MODELS = ["vit", "cnn", "dino"]
REPORT = EvalReport({
    "models": MODELS, "split": "val", "n_tokens": 12345,
    "r2": [[0.9, 0.55, 0.61], [0.3, 0.8, -0.2], [0.5, 0.59, 0.95]],
    "l0": {"vit": 12.5, "cnn": 30.0, "dino": 7.0},
    "dead_fraction": {"vit": 0.1, "cnn": 0.25, "dino": 0.0},
    "concept_classes": {"thresholds": {"universal_fe_at_least": 0.8,
                                       "model_specific_fe_at_most": 0.3}},
    "summary": {},
})


def _concepts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        cof = float(rng.integers(1, 1000))
        out.append({"concept": k, "energy": f"{cof ** 0.8 * float(rng.uniform(0.5, 2)):.6f}",
                    "cofires": f"{cof}", "firing_entropy": "" if k % 7 == 0 else
                    f"{rng.uniform(0, 1):.4f}",
                    **{f"cofire_proportion_{m}": f"{rng.uniform(0, 1):.4f}" for m in MODELS}})
    return out


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_the_r2_matrix_shows_every_cell_and_names_its_axes():
    fig = plots._r2_matrix(plt, REPORT, [])
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), np.asarray(REPORT.r2))
    assert ax.images[0].get_clim() == (-0.2, 1.0)  # from the lowest value (or 0) to 1
    texts = {(t.get_position(), t.get_text()): t.get_color() for t in ax.texts}
    for i, row in enumerate(REPORT.r2):
        for j, v in enumerate(row):
            color = "white" if v < 0.6 else "black"
            assert texts[((j, i), f"{v:.2f}")] == color
    assert [t.get_text() for t in ax.get_xticklabels()] == MODELS
    assert [t.get_text() for t in ax.get_yticklabels()] == MODELS
    assert ax.get_xlabel() == "decoded into" and ax.get_ylabel() == "encoded from"
    assert ax.get_title() == "R² on val (12,345 tokens)"
    assert len(fig.axes) == 2  # and its colour bar
    assert tuple(fig.get_size_inches()) == pytest.approx((1.6 + 1.1 * 3, 1.2 + 1.0 * 3))


def test_an_r2_matrix_of_positive_values_starts_its_scale_at_0():
    report = EvalReport({**REPORT.to_json(), "r2": [[0.9, 0.5], [0.4, 0.7]],
                         "models": ["a", "b"]})
    ax = plots._r2_matrix(plt, report, []).axes[0]
    assert ax.images[0].get_clim() == (0.0, 1.0)


def test_the_firing_entropy_histogram_counts_firing_concepts_and_marks_the_classes():
    concepts = _concepts()
    fe = [float(c["firing_entropy"]) for c in concepts if c["firing_entropy"] != ""]
    ax = plots._firing_entropy(plt, REPORT, concepts).axes[0]
    heights = [p.get_height() for p in ax.patches]
    want, edges = np.histogram(fe, bins=np.linspace(0, 1, 26))
    assert heights == want.tolist() and len(heights) == 25
    lines = {line.get_label(): line.get_xdata()[0] for line in ax.lines}
    assert lines == {"universal ≥ 0.8": 0.8, "model-specific ≤ 0.3": 0.3}  # the report's
    assert ax.get_title() == f"Firing entropy ({len(fe)} firing concepts of 40)"
    assert ax.get_xlabel() == "firing entropy (0: one model, 1: all models equally)"
    assert ax.get_ylabel() == "concepts"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)


def test_cofires_against_energy_is_fitted_on_log_axes():
    concepts = _concepts()
    ax = plots._cofires_vs_energy(plt, REPORT, concepts).axes[0]
    x = np.log10([float(c["cofires"]) for c in concepts])
    y = np.log10([float(c["energy"]) for c in concepts])
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    (line,) = ax.lines
    assert line.get_label() == f"slope {slope:.2f}, r = {r:.2f}"
    xs = np.linspace(x.min(), x.max(), 50)
    np.testing.assert_allclose(line.get_xdata(), 10 ** xs)
    np.testing.assert_allclose(line.get_ydata(), 10 ** (slope * xs + intercept))
    points = ax.collections[0].get_offsets()
    assert len(points) == 40
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_title() == "Co-fires vs energy"
    assert ax.get_xlabel() == "co-fires (tokens where every model fires)"
    assert ax.get_ylabel() == "energy"


def test_concepts_that_never_co_fire_are_left_out_of_the_fit():
    concepts = _concepts(10)
    concepts[0]["cofires"] = "0"
    concepts[1]["energy"] = "0"
    ax = plots._cofires_vs_energy(plt, REPORT, concepts).axes[0]
    assert len(ax.collections[0].get_offsets()) == 8


@pytest.mark.parametrize("rows", [
    [(1, 2), (10, 20)],  # two points: too few
    [(5, 1), (5, 2), (5, 3)],  # no spread in co-fires
    [(1, 4), (2, 4), (3, 4)],  # no spread in energy
])
def test_too_few_points_say_so_instead_of_a_fit(rows):
    concepts = [{"energy": str(e), "cofires": str(c)} for c, e in rows]
    ax = plots._cofires_vs_energy(plt, REPORT, concepts).axes[0]
    (text,) = ax.texts
    assert text.get_text() == "too few co-firing concepts to fit"
    assert text.get_position() == (0.5, 0.5) and text.get_ha() == "center"
    assert text.get_transform() == ax.transAxes  # the middle of the axes, not of the data
    assert len(ax.lines) == 0 and ax.get_xscale() == "linear"


@pytest.mark.parametrize("rows", [
    [(1, 2), (10, 20), (100, 30)],  # three points are enough
    [(10, 2), (12, 3), (15, 2.5)],  # a spread under a decade in co-fires
    [(1, 0.5), (10, 0.6), (100, 0.7)],  # energies below 1 (and under a decade)
])
def test_three_points_with_any_spread_are_fitted(rows):
    concepts = [{"energy": str(e), "cofires": str(c)} for c, e in rows]
    ax = plots._cofires_vs_energy(plt, REPORT, concepts).axes[0]
    assert len(ax.lines) == 1 and len(ax.collections[0].get_offsets()) == 3


def test_cofire_proportion_is_one_line_per_model_in_energy_order():
    concepts = _concepts(12)
    concepts[4]["cofire_proportion_cnn"] = ""  # not measured: a gap
    ax = plots._cofire_proportion(plt, REPORT, concepts).axes[0]
    order = np.argsort([-float(c["energy"]) for c in concepts])
    assert [line.get_label() for line in ax.lines] == MODELS
    for line, m in zip(ax.lines, MODELS):
        want = [float(concepts[k][f"cofire_proportion_{m}"] or "nan") for k in order]
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 13))
        np.testing.assert_array_equal(line.get_ydata(), want)
    assert ax.get_xscale() == "log" and ax.get_title() == "Co-fire proportion by concept rank"
    assert ax.get_xlabel() == "concept rank by energy"
    assert ax.get_ylabel() == "co-fire proportion"


def test_dead_fraction_and_l0_are_bars_per_model():
    fig = plots._dead_and_l0(plt, REPORT, [])
    dead, l0 = fig.axes
    assert [p.get_height() for p in dead.patches] == [0.1, 0.25, 0.0]
    assert [p.get_height() for p in l0.patches] == [12.5, 30.0, 7.0]
    assert dead.get_ylim() == (0, 1) and dead.get_title() == "dead fraction"
    assert l0.get_title() == "L0 (active concepts / token)"
    assert [t.get_text() for t in dead.get_xticklabels()] == MODELS
    colors = [tuple(p.get_facecolor()) for p in dead.patches]
    assert len(set(colors)) == 3 and colors == [tuple(p.get_facecolor()) for p in l0.patches]


def test_more_models_than_colours_reuse_the_palette():
    models = [f"m{i}" for i in range(8)]
    report = EvalReport({**REPORT.to_json(), "models": models,
                         "dead_fraction": {m: 0.1 for m in models},
                         "l0": {m: 1.0 for m in models}})
    bars = plots._dead_and_l0(plt, report, []).axes[0].patches
    assert bars[0].get_facecolor() == bars[6].get_facecolor()
    assert bars[1].get_facecolor() == bars[7].get_facecolor()
    assert bars[0].get_facecolor() != bars[1].get_facecolor()


def test_make_plots_writes_each_png_and_returns_their_paths(tmp_path):
    paths = plots.make_plots(tmp_path, REPORT, _concepts())
    assert [p.name for p in paths] == ["r2_matrix.png", "firing_entropy.png",
                                       "cofires_vs_energy.png", "cofire_proportion_by_rank.png",
                                       "dead_and_l0.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.info["dpi"][0] == pytest.approx(110, abs=1)  # saved at the stated dpi
    assert plt.get_fignums() == []  # every figure closed


def test_without_matplotlib_there_are_no_plots(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plots.make_plots(tmp_path, REPORT, []) == []
    assert list(tmp_path.iterdir()) == []


def _rgba(color):
    return matplotlib.colors.to_rgba(color)


def test_every_figure_is_drawn_in_the_declared_style():
    style = plots.STYLE
    concepts = _concepts()
    fig = plots._r2_matrix(plt, REPORT, concepts)
    ax, bar = fig.axes
    assert ax.images[0].get_cmap().name == style["cmap"]
    assert bar.get_ylim() == pytest.approx(ax.images[0].get_clim())  # the image's scale
    assert {t.get_fontsize() for t in ax.texts} == {style["cell_fontsize"]}
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {style["tick_rotation"]}
    assert {t.get_ha() for t in ax.get_xticklabels()} == {"right"}

    fig = plots._firing_entropy(plt, REPORT, concepts)
    ax = fig.axes[0]
    assert tuple(fig.get_size_inches()) == style["size_hist"]
    assert {p.get_facecolor() for p in ax.patches} == {_rgba(style["hist"])}
    assert {p.get_edgecolor() for p in ax.patches} == {_rgba("white")}
    assert [(line.get_color(), line.get_linestyle()) for line in ax.lines] == [
        (style["universal"], "--"), (style["specific"], "--")]
    assert {t.get_fontsize() for t in ax.get_legend().get_texts()} == {style["legend_fontsize"]}

    fig = plots._cofires_vs_energy(plt, REPORT, concepts)
    ax = fig.axes[0]
    assert tuple(fig.get_size_inches()) == style["size_scatter"]
    points = ax.collections[0]
    assert tuple(points.get_facecolor()[0][:3]) == _rgba(style["points"])[:3]
    assert points.get_alpha() == style["point_alpha"]
    assert points.get_sizes().tolist() == [style["point_size"]]
    assert ax.lines[0].get_color() == style["fit"]
    assert len(ax.lines[0].get_xdata()) == style["fit_points"]

    fig = plots._cofire_proportion(plt, REPORT, concepts)
    assert tuple(fig.get_size_inches()) == style["size_rank"]
    assert {line.get_linewidth() for line in fig.axes[0].lines} == {style["line_width"]}
    assert {t.get_fontsize() for t in fig.axes[0].get_legend().get_texts()} == {
        style["legend_fontsize"]}

    fig = plots._dead_and_l0(plt, REPORT, concepts)
    assert tuple(fig.get_size_inches()) == style["size_bars"]
    assert [a.get_position().x0 < 0.5 for a in fig.axes] == [True, False]  # side by side
    for a in fig.axes:
        assert [p.get_facecolor() for p in a.patches] == [_rgba(c) for c in style["models"][:3]]
        assert {t.get_rotation() for t in a.get_xticklabels()} == {style["tick_rotation"]}


def test_cells_are_centred_and_a_value_at_the_boundary_is_dark_on_light():
    report = EvalReport({**REPORT.to_json(), "r2": [[0.6, 0.5], [0.4, 0.7]],
                         "models": ["a", "b"]})
    ax = plots._r2_matrix(plt, report, []).axes[0]
    colors = {t.get_text(): t.get_color() for t in ax.texts}
    assert colors == {"0.60": "black", "0.50": "white", "0.40": "white", "0.70": "black"}
    assert {(t.get_ha(), t.get_va()) for t in ax.texts} == {("center", "center")}


def test_the_colour_bar_is_the_declared_fraction_of_the_matrixs_height():
    fig = plots._r2_matrix(plt, REPORT, [])
    ax, bar = fig.axes
    fig.canvas.draw()
    assert bar.get_position().height == pytest.approx(
        plots.STYLE["colorbar_shrink"] * ax.get_position(original=True).height, rel=1e-6)


def test_the_declared_colour_map_wins_over_the_users_matplotlib_defaults():
    with matplotlib.rc_context({"image.cmap": "magma"}):
        ax = plots._r2_matrix(plt, REPORT, []).axes[0]
    assert ax.images[0].get_cmap().name == plots.STYLE["cmap"]


def test_only_the_model_names_are_slanted_under_the_bars():
    fig = plots._dead_and_l0(plt, REPORT, _concepts())
    for a in fig.axes:
        assert {t.get_rotation() for t in a.get_yticklabels()} == {0.0}
    assert fig.axes[0].get_ylim() == (0.0, 1.0)  # a fraction: the whole range
