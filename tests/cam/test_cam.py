"""``usae cam``: the spectrum, the optimization, the checks, and bad input (CPU, small)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import cache_and_train, prebuilt
from usae.cam.maximize import build_cam_models, optimize, run_cam
from usae.cam.spectrum import analytic_spectrum, estimate_spectrum, fit_alpha, radial_frequency
from usae.cli import main
from usae.errors import UsaeError
from usae.options import CamOptions
from usae.sae.model import UniversalSAE
from usae.store.store import Store

SPECS = (
    "effnet:lite0?img_size=64&name=lite0,"
    "timm:vit_tiny_patch16_224?img_size=64&pretrained=0&name=vit")


def synthetic_images(n: int, size: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """Images whose amplitude spectrum is exactly f^-alpha (random phases), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    f = radial_frequency(size).clamp_min(1.0 / size)
    mag = f ** -alpha
    mag[0, 0] = 0
    out = []
    for _ in range(n):
        phase = (torch.rand(3, *mag.shape, generator=g) * 2 - 1) * math.pi
        x = torch.fft.irfft2(torch.polar(mag.expand(3, -1, -1), phase), s=(size, size),
                             norm="ortho")
        out.append(0.5 + 0.1 * x / x.std())
    return torch.stack(out).clamp(0, 1)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.5])
def test_spectrum_estimation_recovers_a_known_power_law(alpha):
    spectrum = estimate_spectrum(synthetic_images(24, 64, alpha), "synthetic")
    assert abs(fit_alpha(spectrum.magnitude) - alpha) < 0.1
    assert abs(fit_alpha(analytic_spectrum(64, alpha).magnitude) - alpha) < 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of 16 photos-like images through EfficientNet-Lite0 and a ViT, and a run
    trained on it (prebuilt once under mutation testing: CAM's code never runs here)."""
    root = tmp_path_factory.mktemp("cam")

    def build(dest):
        rng = np.random.default_rng(0)
        for i in range(16):
            base = rng.integers(0, 255, (1, 1, 3))
            grad = np.linspace(0, 1, 80)[None, :, None] * rng.integers(0, 255, (1, 1, 3))
            arr = np.clip(base * 0.5 + grad + rng.normal(0, 25, (80, 80, 3)), 0, 255)
            path = dest / "imgs" / f"c{i % 2}" / f"{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(path)
        cache_and_train(dest, SPECS, "demo", {"n_concepts": 32, "k": 4, "batch_images": 4,
                                              "max_steps": 30})

    prebuilt("cam-trained", root, build)
    return root


def test_objective_rises_and_the_same_seed_gives_the_same_image(trained):
    """On EfficientNet-Lite0 (and a random ViT with a CLS token and another grid, through the
    same path) the objective rises at least 5x within a few dozen steps, bit for bit again."""
    sae = UniversalSAE.load(trained / "run").eval()
    store = Store(trained / "store")
    models = build_cam_models(sae, store, torch.device("cpu"))
    assert models["vit"].b.n_prefix == 1 and models["vit"].b.grid != models["lite0"].b.grid
    spectrum = analytic_spectrum(64)
    o = CamOptions(steps=40, size=64, crops=2, lr=0.3)
    a = optimize(models["lite0"], 3, spectrum, o, progress=False)
    start, best = a["trace"][0][1], max(v for _, v in a["trace"])
    # the best value, not the last: random crops make the trace noisy, and the last point's
    # noise depends on the machine's BLAS threads (one 2-thread run ended 15.5 -> 10.8)
    assert start > 0 and best >= 5 * start, a["trace"]
    v = optimize(models["vit"], 3, analytic_spectrum(48),
                 CamOptions(steps=30, size=48, crops=1, lr=0.3), progress=False)
    assert max(x for _, x in v["trace"]) > v["trace"][0][1] and v["image"].shape == (3, 48, 48)
    o = CamOptions(steps=5, size=48, crops=2)
    spectrum = analytic_spectrum(48)
    a = optimize(models["lite0"], 3, spectrum, o, progress=False)
    b = optimize(models["lite0"], 3, spectrum, o, progress=False)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["alpha"], b["alpha"])


def test_usae_cam_writes_images_alpha_grid_and_checks(trained, tmp_path, capsys):
    assert main(["cam", str(trained / "run"), "--store", str(trained / "store"), "--concept",
                 "3", "--out", str(tmp_path / "cam"), "--steps", "8", "--size", "48",
                 "--crops", "1"]) == 0
    folder = tmp_path / "cam" / "3"
    for name in ("lite0.png", "vit.png", "lite0_alpha.png", "vit_alpha.png", "grid.png",
                 "cam.json"):
        assert (folder / name).exists(), name
    doc = json.loads((folder / "cam.json").read_text())
    assert set(doc["self_ratio"]) == {"lite0", "vit"}
    assert np.asarray(doc["transfer"]).shape == (2, 2)
    assert np.asarray(doc["transfer_control"]).shape == (2, 2)
    assert doc["settings"]["steps"] == 8 and doc["control_concept"] != 3
    assert (tmp_path / "cam" / "spectrum.safetensors").exists()
    assert "estimated from 16" in doc["spectrum"]
    assert Image.open(folder / "lite0.png").size == (48, 48)
    assert "self score" in capsys.readouterr().out
    assert "NaN" not in (folder / "cam.json").read_text()


def test_self_and_transfer_scores_are_robust_scores_of_the_saved_pngs(trained, tmp_path):
    """self_ratio[m] and transfer[m][j] = (activation on the re-read 8-bit PNG - natural
    median) / max(q99 - median, 0.1 x the model's median spread), recomputed here with NumPy
    from the store's activations; the control fires about as often as the concept."""
    res = run_cam(trained / "run", trained / "store", [5], out=tmp_path / "c", steps=6, size=48,
                  crops=1, progress=False)[5]
    sae = UniversalSAE.load(trained / "run").eval()
    store = Store(trained / "store")
    models = build_cam_models(sae, store, torch.device("cpu"))
    from usae.data.images import load_rgb

    def score(m: str, value: float) -> float:
        x = store.read(m, store.rows("all"))
        with torch.no_grad():
            pre = sae.encoders[m](sae.standardize(m, x.reshape(-1, x.shape[-1])))
        means = pre.reshape(x.shape[0], x.shape[1], -1).mean(1).double().numpy()  # (img, n)
        spread = np.quantile(means, 0.99, axis=0) - np.quantile(means, 0.5, axis=0)
        scale = max(spread[5], 0.1 * float(np.median(spread)))
        return (value - float(np.quantile(means[:, 5], 0.5))) / scale

    names = ["lite0", "vit"]
    for i, m in enumerate(names):
        image = load_rgb(tmp_path / "c" / "5" / f"{m}.png")
        assert res["self_ratio"][m] == pytest.approx(
            score(m, float(models[m].natural(image)[5])), rel=1e-3, abs=1e-3)
        for j, v in enumerate(names):
            assert res["transfer"][i][j] == pytest.approx(
                score(v, float(models[v].natural(image)[5])), rel=1e-3, abs=1e-3)
    assert res["control_concept"] != 5
    assert np.isfinite(np.asarray(res["transfer_control"], dtype=float)).all()


def test_a_weak_concept_gets_a_finite_score_and_the_control_matches_its_frequency():
    """A concept whose natural values barely spread takes the model's floor, not ~0; the
    control is drawn from the concepts of nearest firing rate, never the concept itself."""
    from usae.cam.maximize import matched_control, robust_score

    flat = {"median": 0.5, "q99": 0.5, "scale": 0.2, "floored": True}
    assert robust_score(0.9, flat) == pytest.approx(2.0)
    rates = torch.tensor([0.5, 0.01, 0.011, 0.2, 0.0, 0.0105, 0.3, 0.4])
    picks = {matched_control(rates, [1], seed, pool=2) for seed in range(20)}
    assert picks == {2, 5}
    assert matched_control(rates, [4], 0, pool=1) != 4


def test_gone_source_images_fall_back_to_the_analytic_spectrum(trained, tmp_path, caplog):
    import shutil

    store2 = tmp_path / "store"
    shutil.copytree(trained / "store", store2)
    manifest = json.loads((store2 / "manifest.json").read_text())
    for img in manifest["images"]:
        img["path"] = str(tmp_path / "gone" / "x.jpg")
    (store2 / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        res = run_cam(trained / "run", store2, [1], out=tmp_path / "c", steps=3, size=48,
                      crops=1, progress=False)
    assert "analytic" in res[1]["spectrum"] and "analytic 1/f" in caplog.text


def test_bad_input_is_a_clear_error(trained, tmp_path, make_arrays, capsys):
    base = ["cam", str(trained / "run"), "--store", str(trained / "store")]
    assert main(base + ["--concept", "999"]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert main(base + ["--concept", "1", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(base) == 2
    assert "--concept" in capsys.readouterr().err
    from usae.store.writer import store_from_arrays

    store_from_arrays(tmp_path / "other", make_arrays())
    with pytest.raises(UsaeError, match="the run has models"):
        run_cam(trained / "run", tmp_path / "other", [1], steps=2, progress=False)


def test_the_spectrum_is_cached_per_size(trained, tmp_path):
    from usae.cam.spectrum import load_or_estimate_spectrum

    store = Store(trained / "store")
    cache_file = tmp_path / "spectrum.safetensors"
    first = load_or_estimate_spectrum(store, cache_file, 48, 8)
    again = load_or_estimate_spectrum(store, cache_file, 48, 8)
    assert torch.equal(first.magnitude, again.magnitude) and again.source == first.source
    assert load_or_estimate_spectrum(store, cache_file, 32, 8).size == 32  # another size


def test_top_without_an_eval_ranks_by_one_kept_eval_of_the_run(trained, tmp_path, monkeypatch):
    """`cam --top` with no --eval evaluates the run once into OUT/ranking-eval (not a
    temporary folder) and reads that eval next time; the concepts are the universal-first
    ranking of that eval's concepts.csv, recomputed here from the csv itself."""
    import csv

    from usae.cam import select as cam_select
    from usae.cam.maximize import RANKING_EVAL
    from usae.sae.model import UniversalSAE

    sae = UniversalSAE.load(trained / "run")
    out = tmp_path / "cam"
    picked = cam_select.pick_concepts(sae, trained / "run", trained / "store", None, 3, None,
                                      progress=False, ranking_dir=out / RANKING_EVAL)
    with open(out / RANKING_EVAL / "concepts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    energy = {int(r["concept"]): float(r["energy"]) for r in rows}
    universal = sorted((k for k in energy if rows[k]["class"] == "universal"),
                       key=lambda k: -energy[k])
    rest = sorted((k for k in energy if rows[k]["class"] != "universal" and energy[k] > 0),
                  key=lambda k: -energy[k])
    assert picked == (universal + rest)[:3]
    monkeypatch.setattr(cam_select, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    assert cam_select.pick_concepts(sae, trained / "run", trained / "store", None, 3, None,
                                    progress=False, ranking_dir=out / RANKING_EVAL) == picked
    with pytest.raises(UsaeError, match="--top needs an eval"):
        cam_select.pick_concepts(sae, trained / "run", trained / "store", None, 3, None)



def test_picking_concepts_checks_ids_at_both_ends_and_ranks_by_one_kept_eval(tmp_path,
                                                                             monkeypatch,
                                                                             caplog):
    """``cam.select.pick_concepts`` by hand: ids 0..n-1 pass and their neighbours do not; --top
    needs N >= 1 and an eval; without one the run is evaluated once, on every image, without
    plots or faithfulness, into the kept folder (a stand-in evaluate records the call)."""
    import logging

    from usae.cam import select
    from usae.config import resolve
    from usae.sae.model import UniversalSAE

    sae = UniversalSAE(resolve(("a",), (4,), "paper", {"n_concepts": 8, "k": 2}).sae)
    run = tmp_path / "run"
    assert select.pick_concepts(sae, run, "S", [0, 7], None, None) == [0, 7]
    for bad in ([8], [-1], [3, 9]):
        with pytest.raises(UsaeError, match=rf"concept\(s\) \[{bad[-1]}\] do not exist; this "
                                            r"run has concepts 0\.\.7"):
            select.pick_concepts(sae, run, "S", bad, None, None)
    with pytest.raises(UsaeError, match=r"concept\(s\) \[\] do not exist"):
        select.pick_concepts(sae, run, "S", [], None, None)
    for top in (0, -1, None):
        with pytest.raises(UsaeError, match=r"give --concept K\[,K\.\.\.\] or --top N"):
            select.pick_concepts(sae, run, "S", None, top, None)
    with pytest.raises(UsaeError) as err:
        select.pick_concepts(sae, run, "S", None, 1, None)
    # the message names `usae cam`'s own flag and a command the CLI parses as an eval
    import re

    from usae.cli import build_parser

    said = re.fullmatch(r"--top needs an eval to rank concepts: pass (--eval) EVAL \(made by "
                        r"`usae (.*)`\)", str(err.value))
    assert said is not None, str(err.value)
    words = said.group(2).split()
    args = build_parser().parse_args(words)
    assert (args.command, args.run, args.store, args.out) == ("eval", "RUN", "STORE", "EVAL")
    cam = build_parser().parse_args(["cam", "R", "--store", "S", "--top", "1", said.group(1),
                                     "E"])
    assert cam.eval == "E"
    calls = []

    def stand_in(run_, store_, out, options, progress, force):
        calls.append((run_, store_, out, options, progress, force))
        out.mkdir(parents=True)
        (out / "concepts.csv").write_text("concept,class,energy\n0,mixed,1.0\n1,universal,0.5\n"
                                          "2,universal,2.0\n")

    monkeypatch.setattr(select, "evaluate", stand_in)
    monkeypatch.setattr(select, "_is_eval_of", lambda d, r, s: (d / "concepts.csv").exists())
    kept = tmp_path / "ranking-eval"
    with caplog.at_level(logging.INFO, logger="usae.cam.select"):
        assert select.pick_concepts(sae, run, "S", None, 1, None, progress=False,
                                    ranking_dir=kept) == [2]
    assert caplog.messages == [f"no --eval given: evaluating the run once on every image "
                               f"into {kept} (the next --top reuses it)"]
    (_, store_, out, options, progress, force), = calls
    assert (store_, out, progress, force) == ("S", kept, False, True)
    assert (options.split, options.plots, options.faithfulness) == ("all", False, False)
    assert select.pick_concepts(sae, run, "S", None, 3, None, ranking_dir=kept) == [2, 1, 0]
    assert len(calls) == 1, "the kept eval is reused"
    (kept / "concepts.csv").unlink()  # gone: evaluated again, with a progress bar by default
    select.pick_concepts(sae, run, "S", None, 1, None, ranking_dir=kept.parent / "again")
    assert calls[-1][4] is True


def test_a_kept_ranking_eval_needs_its_report_and_concepts_of_this_run_only(tmp_path):
    import hashlib

    from usae.cam.select import _is_eval_of
    from usae.config import resolve
    from usae.sae.model import UniversalSAE

    sae = UniversalSAE(resolve(("a",), (4,), "paper", {"n_concepts": 8, "k": 2}).sae)
    run, ev = tmp_path / "run", tmp_path / "ev"
    run.mkdir()
    ev.mkdir()
    (run / "model.safetensors").write_bytes(b"w")
    digest = hashlib.sha256(b"w").hexdigest()
    assert not _is_eval_of(ev, run, sae)
    (ev / "concepts.csv").write_text("concept,class,energy\n")
    (ev / "report.json").write_text(json.dumps({"models": ["a"], "n_concepts": 8,
                                                "run": {"weights_sha256": digest}}))
    assert _is_eval_of(ev, run, sae), "no top images needed to rank"
    (ev / "report.json").write_text(json.dumps({"models": ["a"], "n_concepts": 8,
                                                "run": {"weights_sha256": "0" * 64}}))
    assert not _is_eval_of(ev, run, sae), "an eval of other weights"
