"""Every metric of ``usae eval`` against a naive dense computation on small random data."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import prebuilt
from usae.analysis.evaluate import evaluate
from usae.config import resolve
from usae.data.sources import StoreSource
from usae.errors import UsaeError
from usae.files import load_safetensors
from usae.sae.model import UniversalSAE
from usae.sae.training import train_run
from usae.store.store import Store
from usae.store.writer import store_from_arrays


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_arrays):
    """A store of 40 images and a 30-step demo-preset run on it (prebuilt under mutation
    testing: conftest.prebuilt)."""
    root = tmp_path_factory.mktemp("eval")
    arrays = make_arrays(n_images=40, tokens=4, dims=(12, 8, 10))

    def build(dest):
        store = store_from_arrays(dest / "store", arrays, dtype="float32")
        cfg = resolve(store.models, store.dims, "demo", {"n_concepts": 24, "k": 3,
                                                         "batch_images": 4, "max_steps": 30})
        train_run(cfg, StoreSource(store, "train"), dest / "run", progress=False,
                  store_manifest=store.manifest)

    prebuilt("evaluate-trained", root, build)
    return root, arrays


def naive(sae, arrays, rows, tau):
    models = sae.models
    raw = {m: torch.from_numpy(arrays[m][rows].reshape(-1, arrays[m].shape[2])).double()
           for m in models}
    sae = sae.double()
    codes = {m: sae.encode(m, raw[m].float()).double() for m in models}
    r2 = np.zeros((3, 3))
    r2p = np.zeros((3, 3))
    for i, mi in enumerate(models):
        for j, mj in enumerate(models):
            w = sae.dictionaries[mj].detach()
            xhat = codes[mi] @ (w / (w.norm(dim=1, keepdim=True) + 1e-8))
            xhat = xhat * getattr(sae, f"scale_{mj}") + getattr(sae, f"mean_{mj}")
            x = raw[mj]
            sse = ((x - xhat) ** 2).sum()
            r2[i, j] = 1 - sse / ((x - x.mean(0)) ** 2).sum()
            r2p[i, j] = 1 - ((x - xhat) ** 2).mean() / ((x - x.mean()) ** 2).mean()
    fires = np.stack([(codes[m] > tau).sum(0).numpy() for m in models])
    cofires = torch.stack([codes[m] > tau for m in models]).all(0).sum(0).numpy()
    energy = sum(np.linalg.norm((codes[m].mean(0)[:, None] *
                                 sae.normalized_dict(m).detach()).numpy(), axis=1)
                 for m in models)
    l0 = {m: float((codes[m] > 0).sum(1).double().mean()) for m in models}
    dead = {m: float(((codes[m] > 0).sum(0) == 0).double().mean()) for m in models}
    per_image = {m: codes[m].view(len(rows), -1, sae.cfg.n).mean(1) for m in models}
    return r2, r2p, fires, cofires, energy, l0, dead, per_image


def test_report_and_csv_match_naive_formulas(trained, tmp_path):
    root, arrays = trained
    report = evaluate(root / "run", root / "store", tmp_path, split="all", threshold=0.1,
                      batch_images=7, progress=False, plots=False)
    store = Store(root / "store")
    rows = store.rows("all")
    sae = UniversalSAE.load(root / "run")
    r2, r2p, fires, cofires, energy, l0, dead, per_image = naive(sae, arrays, rows, 0.1)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["models"] == ["m0", "m1", "m2"] and saved["threshold"] == 0.1
    assert saved["n_tokens"] == len(rows) * 4
    np.testing.assert_allclose(saved["r2"], r2, atol=1e-5)
    np.testing.assert_allclose(saved["r2_paper"], r2p, atol=1e-5)
    for m in sae.models:
        assert saved["l0"][m] == pytest.approx(l0[m])
        assert saved["dead_fraction"][m] == pytest.approx(dead[m])
    with open(tmp_path / "concepts.csv") as fh:
        table = list(csv.DictReader(fh))
    cols = ["concept", "energy", "firing_entropy", "fires_m0", "fires_m1", "fires_m2", "cofires",
            "cofire_proportion_m0", "cofire_proportion_m1", "cofire_proportion_m2"]
    assert list(table[0])[:len(cols)] == cols and len(table) == 24
    for k, row in enumerate(table):
        assert int(row["concept"]) == k
        assert float(row["energy"]) == pytest.approx(float(energy[k]), rel=1e-5, abs=1e-9)
        for j, m in enumerate(sae.models):
            assert int(row[f"fires_{m}"]) == fires[j, k]
        assert int(row["cofires"]) == cofires[k]
        total = fires[:, k].sum()
        if total == 0:
            assert row["firing_entropy"] == ""
            assert row["cofire_proportion_m0"] == ""
        else:
            p = fires[:, k] / total
            fe = -sum(x * math.log(x) for x in p if x > 0) / math.log(3)
            assert float(row["firing_entropy"]) == pytest.approx(fe, abs=1e-9)
            for j, m in enumerate(sae.models):
                cfp = row[f"cofire_proportion_{m}"]
                assert (cfp == "" and fires[j, k] == 0) or \
                    float(cfp) == pytest.approx(cofires[k] / fires[j, k])
    classes = report["concept_classes"]
    assert classes["never_fire"] == sum(1 for r in table if r["firing_entropy"] == "")
    # classes: FE >= 0.85 universal; FE <= 0.2 specific to the model that fires most
    want_classes = []
    for k, row in enumerate(table):
        fe_k = None if row["firing_entropy"] == "" else float(row["firing_entropy"])
        owner = sae.models[int(np.argmax(fires[:, k]))]
        want_classes.append("dead" if fe_k is None else "universal" if fe_k >= 0.85 else
                            f"specific:{owner}" if fe_k <= 0.2 else "mixed")
    assert [r["class"] for r in table] == want_classes
    assert classes["universal"] == want_classes.count("universal")
    assert classes["model_specific"] == {m: want_classes.count(f"specific:{m}")
                                         for m in sae.models}
    # mse: per element in raw space; summary: diagonal and off-diagonal means of r2
    n_tok = len(rows) * 4
    for i in range(3):
        for j, m in enumerate(sae.models):
            assert saved["mse"][i][j] == pytest.approx((1 - r2[i, j]) * np.var(
                arrays[m][rows].reshape(n_tok, -1), axis=0).sum() / arrays[m].shape[2],
                rel=1e-4)
    off = ~np.eye(3, dtype=bool)
    assert saved["summary"]["self_r2_mean"] == pytest.approx(np.diag(r2).mean(), abs=1e-5)
    assert saved["summary"]["cross_r2_mean"] == pytest.approx(r2[off].mean(), abs=1e-5)
    fe_all = [float(r["firing_entropy"]) for r in table if r["firing_entropy"] != ""]
    assert saved["summary"]["firing_entropy_median"] == pytest.approx(np.median(fe_all))
    # per-model rankings: the top image of concept k in model m has its highest mean code
    for j, m in enumerate(sae.models):
        for k in range(24):
            best = per_image[m][:, k].max().item()
            if best > 0:
                r = list(rows).index(int(top_rows_of(tmp_path, m)[k, 0]))
                assert per_image[m][r, k].item() == pytest.approx(best, rel=1e-5)
    # top images: the paper's ranking (mean activation over tokens, averaged over models)
    top = load_safetensors(tmp_path / "top_images.safetensors")
    # rows are store row ids (int64, -1 = no image), exact at any store size
    assert all(v.dtype == torch.int64 for key, v in top.items() if key.startswith("rows."))
    mean_scores = torch.stack([per_image[m] for m in sae.models]).mean(0)  # (images, n)
    for k in range(24):
        best = mean_scores[:, k].max().item()
        if best > 0:
            assert top["scores.mean"][k, 0].item() == pytest.approx(best, rel=1e-5)
            assert mean_scores[list(rows).index(int(top["rows.mean"][k, 0])), k] == \
                pytest.approx(best, rel=1e-5)


def top_rows_of(folder, key):
    return load_safetensors(folder / "top_images.safetensors")[f"rows.{key}"]


def test_without_a_val_split_eval_falls_back_to_every_image(make_arrays, tmp_path, caplog):
    arrays = make_arrays(n_images=12)
    store = store_from_arrays(tmp_path / "s", arrays, splits=["train"] * 12)
    cfg = resolve(store.models, store.dims, "paper", {"n_concepts": 16, "k": 2,
                                                      "batch_images": 4, "max_steps": 2})
    train_run(cfg, StoreSource(store, "train"), tmp_path / "run", progress=False)
    with caplog.at_level("WARNING"):
        report = evaluate(tmp_path / "run", tmp_path / "s", tmp_path / "e", progress=False,
                          plots=False)
    assert report["split"] == "all" and report["n_images"] == 12 and "no 'val'" in caplog.text


def test_plots_are_written(trained, tmp_path):
    root, _ = trained
    evaluate(root / "run", root / "store", tmp_path, progress=False)
    for name in ("r2_matrix", "firing_entropy", "cofires_vs_energy", "cofire_proportion_by_rank",
                 "dead_and_l0"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_bad_inputs(trained, tmp_path):
    root, arrays = trained
    other = {m: a[:, :, :5] for m, a in arrays.items()}
    store_from_arrays(tmp_path / "other", other)
    with pytest.raises(UsaeError, match="d=12 but the store has d=5"):
        evaluate(root / "run", tmp_path / "other", tmp_path / "e1", progress=False)
    renamed = {f"x{i}": a for i, a in enumerate(arrays.values())}
    store_from_arrays(tmp_path / "renamed", renamed)
    with pytest.raises(UsaeError, match="models"):
        evaluate(root / "run", tmp_path / "renamed", tmp_path / "e2", progress=False)
    with pytest.raises(UsaeError, match="split 'test'.*empty"):
        evaluate(root / "run", root / "store", tmp_path / "e3", split="test", progress=False)


def test_layer_mismatch_is_a_warning(trained, tmp_path, caplog):
    root, arrays = trained
    cfg = json.loads((root / "run" / "config.json").read_text())
    cfg["store"]["models"]["m0"]["layer"] = "blocks.3"
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "config.json").write_text(json.dumps(cfg))
    (run2 / "model.safetensors").write_bytes((root / "run" / "model.safetensors").read_bytes())
    store = json.loads((root / "store" / "manifest.json").read_text())
    store["models"]["m0"]["layer"] = "blocks.11"
    import shutil

    shutil.copytree(root / "store", tmp_path / "store2")
    (tmp_path / "store2" / "manifest.json").write_text(json.dumps(store))
    with caplog.at_level("WARNING"):
        evaluate(run2, tmp_path / "store2", tmp_path / "e", progress=False, plots=False)
    assert "layer" in caplog.text and "m0" in caplog.text


def test_independent_and_shuffled_controls_end_to_end(trained, tmp_path):
    root, arrays = trained
    store = Store(root / "store")
    cfg = resolve(store.models, store.dims, "demo", {"n_concepts": 24, "k": 3,
                                                     "batch_images": 4, "max_steps": 40,
                                                     "shuffle_pairing": True})
    train_run(cfg, StoreSource(store, "train"), tmp_path / "shuffled", progress=False)
    train_run(cfg, StoreSource(store, "train"), tmp_path / "independent", independent=True,
              progress=False)
    for m in store.models:
        assert UniversalSAE.load(tmp_path / "independent" / m).models == (m,)
        assert UniversalSAE.load(tmp_path / "independent" / m).cfg.n == 24
    report = evaluate(root / "run", root / "store", tmp_path / "eval", progress=False,
                      plots=False, independent=tmp_path / "independent",
                      compare=[tmp_path / "shuffled"])
    ind = report["independent"]["models"]
    assert set(ind) == {"m0", "m1", "m2"}
    from usae.analysis.controls import independent_consistency

    direct = independent_consistency(UniversalSAE.load(root / "run"), tmp_path / "independent")
    assert report["independent"] == direct
    rows = report["comparison"]
    assert [r["shuffle_pairing"] for r in rows] == [False, True]
    assert {"cross_r2_mean", "firing_entropy_median", "dead_fraction_mean"} <= set(rows[1])


def _codes(values, indices):
    return (torch.tensor(values, dtype=torch.float32), torch.tensor(indices))


def test_concept_accumulator_and_concept_numbers_by_hand(monkeypatch):
    """Guards ConceptAccumulator and the per-concept numbers against hand-computed values:
    fires are strictly above τ (a value equal to τ does not fire), a selected zero is not
    active, co-fires need every model, top images merge across batches, the firing entropy
    (a concept firing in one model only: 0; equally in both: 1; never: NaN, without warnings),
    co-fire proportions, dead concepts, energy with a zero dictionary row (0, not inf), and the
    classes at their exact thresholds."""
    import warnings

    import usae.analysis.evaluate as ev

    acc = ev.ConceptAccumulator(("a", "b"), n=4, threshold=0.5, top=2)
    # 2 images x 2 tokens; k = 2 selected (value, concept) per token
    acc.update({"a": _codes([[0.9, 0.5], [0.6, 0.0], [0.0, 0.0], [2.0, 0.7]],
                            [[0, 1], [0, 2], [1, 2], [0, 1]]),
                "b": _codes([[0.8, 0.1], [0.4, 0.0], [0.0, 0.0], [1.0, 0.0]],
                            [[0, 3], [0, 1], [1, 2], [0, 2]])},
               torch.tensor([10, 11]), tokens=2)
    acc.update({"a": _codes([[2.6, 0.0], [0.0, 0.0]], [[0, 1], [1, 2]]),
                "b": _codes([[0.2, 0.0], [0.0, 0.0]], [[3, 1], [1, 2]])},
               torch.tensor([12]), tokens=2)
    assert acc.tokens == 6 and acc.l0_sum.dtype == torch.float64  # sums reach 1e10
    # fires (> 0.5): a: concept 0 at tokens 0, 1, 3, 4; concept 1 at token 3 (0.7)
    assert acc.fires.tolist() == [[4, 1, 0, 0], [2, 0, 0, 0]]
    assert acc.active.tolist() == [[4, 2, 0, 0], [3, 0, 0, 2]]
    assert acc.l0_sum.tolist() == [6, 5]
    assert acc.cofires.tolist() == [2, 0, 0, 0]  # tokens 0 and 3 fire concept 0 in both
    # per-image mean codes of concept 0, model a: image 10 (0.9+0.6)/2, 11: 2/2, 12: 2.6/2
    assert acc.top_rows["a"][0].tolist() == [12, 11]
    assert torch.allclose(acc.top_scores["a"][0], torch.tensor([1.3, 1.0]))
    # mean over models, concept 0: image 10 (0.75+0.6)/2, 11 (1+0.5)/2, 12 (1.3+0)/2
    assert acc.top_rows["mean"][0].tolist() == [11, 10]
    assert acc.top_rows["a"].dtype == torch.long

    norms = {"a": torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64),
             "b": torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr = ev._concept_arrays(("a", "b"), {"concepts": acc, "dict_norms": norms})
    assert arr["fe"][0] == pytest.approx(-(4 / 6 * math.log(4 / 6) + 2 / 6 * math.log(2 / 6))
                                         / math.log(2))
    assert arr["fe"][1] == 0.0 and math.isnan(arr["fe"][2]) and math.isnan(arr["fe"][3])
    np.testing.assert_allclose(arr["cfp"][:, 0], [2 / 4, 2 / 2])
    assert arr["cfp"][0, 1] == 0.0 and math.isnan(arr["cfp"][1, 1])
    assert arr["dead"].tolist() == [[False, False, True, True], [False, True, True, False]]
    mean_a = np.array([6.1, 1.2, 0.0, 0.0]) / 6
    mean_b = np.array([2.2, 0.0, 0.0, 0.3]) / 6
    np.testing.assert_allclose(arr["energy_mn"], [mean_a * [1, 1, 0, 1], mean_b * [1, 2, 1, 1]])
    assert arr["specific"].tolist() == [False, True, False, False]
    assert arr["universal"].tolist() == [True, False, False, False]  # FE 0.918
    assert arr["owner"][1] == 0
    # the class boundaries are inclusive: equal fires give FE exactly 1, one model's FE is 0
    monkeypatch.setattr(ev, "UNIVERSAL_FE", 1.0)
    monkeypatch.setattr(ev, "SPECIFIC_FE", 0.0)
    even = ev.ConceptAccumulator(("a", "b"), n=2, threshold=0.5, top=1)
    even.update({"a": _codes([[1.0], [1.0]], [[0], [1]]), "b": _codes([[1.0], [0.0]], [[0], [1]])},
                torch.tensor([0]), tokens=2)
    arr = ev._concept_arrays(("a", "b"), {"concepts": even, "dict_norms": {
        m: torch.ones(2, dtype=torch.float64) for m in ("a", "b")}})
    assert arr["universal"].tolist() == [True, False]
    assert arr["specific"].tolist() == [False, True]


def test_entropy_of_one_model_and_a_single_fire():
    """Guards FE for a one-model SAE (0, not NaN from log 1) and for a concept that fired once
    (defined, not NaN)."""
    from usae.analysis.evaluate import _entropy

    assert _entropy(np.array([[3.0, 0.0]])).tolist()[0] == 0.0
    assert math.isnan(_entropy(np.array([[3.0, 0.0]]))[1])
    assert _entropy(np.array([[1.0], [0.0]])).tolist() == [0.0]


def test_one_token_report_numbers():
    """Guards the token count in the per-token means down to one token."""
    from types import SimpleNamespace

    import usae.analysis.evaluate as ev
    from usae.analysis.metrics import R2Accumulator

    acc = ev.ConceptAccumulator(("a",), n=3, threshold=0.1, top=1)
    acc.update({"a": _codes([[2.0, 1.0]], [[0, 2]])}, torch.tensor([0]), tokens=1)
    r2 = R2Accumulator(("a",), (2,))
    stats = {"concepts": acc, "r2": r2, "dict_norms": {"a": torch.ones(3, dtype=torch.float64)}}
    sae = SimpleNamespace(models=("a",), cfg=SimpleNamespace(n=3))
    report, rows = ev._report(sae, stats, 0.1, "all", np.array([0]))
    assert report["l0"] == {"a": 2.0}
    assert [r["energy"] for r in rows] == [2.0, 0.0, 1.0]


def test_comparison_rows_carry_each_runs_settings(trained, tmp_path, capsys):
    """Guards the comparison: other runs are evaluated with this eval's options (split,
    threshold) and without progress bars, and each row carries the run's own settings."""
    from usae.analysis.evaluate import _comparison_row

    root, _ = trained
    report = evaluate(root / "run", root / "store", tmp_path / "e", progress=False,
                      plots=False, split="all", threshold=0.3, compare=[root / "run"])
    assert capsys.readouterr().err == ""
    other = json.loads((tmp_path / "e" / "compare" / "0-run" / "report.json").read_text())
    assert other["split"] == "all" and other["threshold"] == 0.3
    cfg = json.loads((root / "run" / "config.json").read_text())
    row = report["comparison"][1]
    assert {k: row[k] for k in ("run", "preset", "shuffle_pairing", "decoder_update",
                                "schedule", "standardize")} == {
        "run": "run", "preset": cfg["preset"], "shuffle_pairing": cfg["train"]["shuffle_pairing"],
        "decoder_update": cfg["train"]["decoder_update"], "schedule": cfg["train"]["schedule"],
        "standardize": cfg["sae"]["standardize"]}
    assert row["cross_r2_mean"] == other["summary"]["cross_r2_mean"]
    unreadable = _comparison_row(tmp_path / "nothing", other)
    assert unreadable["preset"] is None and unreadable["schedule"] is None
    assert unreadable["standardize"] is None


def test_progress_bar_counts_images(trained, tmp_path, capsys):
    """Guards eval's progress bar: its label, unit and count of images (shown when asked)."""
    root, _ = trained
    report = evaluate(root / "run", root / "store", tmp_path / "e", progress=True, plots=False,
                      split="all")
    err = capsys.readouterr().err
    n = report["n_images"]
    assert "eval: 100%" in err and f"{n}/{n}" in err and "img/s" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_on_cuda_matches_the_cpu(trained, tmp_path):
    """Guards eval's device handling (the store's batches moved to the SAE's device)."""
    root, _ = trained
    cpu = evaluate(root / "run", root / "store", tmp_path / "c", progress=False, plots=False)
    gpu = evaluate(root / "run", root / "store", tmp_path / "g", progress=False, plots=False,
                   device="cuda")
    np.testing.assert_allclose(gpu["r2"], cpu["r2"], atol=1e-4)
    assert gpu["l0"] == pytest.approx(cpu["l0"])


def test_concepts_csv_rows_and_report_schema_by_hand(tmp_path):
    """Guards concepts.csv cells (empty for undefined entropies and proportions; classes
    dead / specific:<model> / universal / mixed; per-model energies), the report's keys and
    class counts per owning model, and a one-concept table (its header comes from row 0)."""
    from types import SimpleNamespace

    import usae.analysis.evaluate as ev
    from usae.analysis.metrics import R2Accumulator

    acc = ev.ConceptAccumulator(("a", "b"), n=4, threshold=0.5, top=1)
    # concept 0 fires in both (universal), 1 only in b (specific:b), 2 only in a, 3 never
    acc.update({"a": _codes([[1.0, 0.9], [0.8, 0.0]], [[0, 2], [0, 3]]),
                "b": _codes([[1.0, 0.7], [0.9, 0.6]], [[0, 1], [0, 1]])},
               torch.tensor([0]), tokens=2)
    ones = {m: torch.ones(4, dtype=torch.float64) for m in ("a", "b")}
    r2 = R2Accumulator(("a", "b"), (2, 2))
    stats = {"concepts": acc, "r2": r2, "dict_norms": ones}
    sae = SimpleNamespace(models=("a", "b"), cfg=SimpleNamespace(n=4))
    report, rows = ev._report(sae, stats, 0.5, "all", np.array([0]))
    assert [r["class"] for r in rows] == ["universal", "specific:b", "specific:a", "dead"]
    assert rows[3]["firing_entropy"] == "" and rows[3]["cofire_proportion_a"] == ""
    assert rows[1]["cofire_proportion_b"] == 0.0 and rows[1]["cofire_proportion_a"] == ""
    assert rows[0]["firing_entropy"] == 1.0 and rows[2]["energy_a"] == pytest.approx(0.45)
    assert rows[2]["energy_b"] == 0.0 and rows[1]["energy_b"] == pytest.approx(0.65)
    classes = report["concept_classes"]
    assert classes == {"thresholds": {"universal_fe_at_least": 0.85,
                                      "model_specific_fe_at_most": 0.2},
                       "universal": 1, "model_specific": {"a": 1, "b": 1}, "never_fire": 1}
    assert set(report) == {"models", "r2", "r2_paper", "mse", "l0", "dead_fraction",
                           "n_tokens", "n_images", "n_concepts", "threshold", "split",
                           "summary", "concept_classes", "jaccard"}
    # token 0: {0, 2} vs {0, 1} -> 1/3; token 1: {0} (a zero code is not active) vs {0, 1} -> 1/2
    assert report["jaccard"] == [[1.0, 0.41667], [0.41667, 1.0]]
    assert report["summary"]["jaccard_cross_mean"] == pytest.approx(0.41667)
    assert report["n_concepts"] == 4 and report["summary"]["never_fire_fraction"] == 0.25
    # one model: no cross R²; nothing fires: no entropy median
    silent = ev.ConceptAccumulator(("a",), n=2, threshold=0.5, top=1)
    silent.update({"a": _codes([[0.1]], [[0]])}, torch.tensor([0]), tokens=1)
    one = SimpleNamespace(models=("a",), cfg=SimpleNamespace(n=2))
    rep1, rows1 = ev._report(one, {"concepts": silent, "r2": R2Accumulator(("a",), (2,)),
                                   "dict_norms": {"a": torch.ones(2, dtype=torch.float64)}},
                             0.5, "all", np.array([0]))
    assert rep1["summary"]["cross_r2_mean"] is None
    assert rep1["summary"]["firing_entropy_median"] is None
    # unequal counts per owner: two concepts only in a, one only in b
    uneven = ev.ConceptAccumulator(("a", "b"), n=3, threshold=0.5, top=1)
    uneven.update({"a": _codes([[1.0, 0.9]], [[0, 1]]), "b": _codes([[0.8, 0.0]], [[2, 0]])},
                  torch.tensor([0]), tokens=1)
    rep2, _ = ev._report(SimpleNamespace(models=("a", "b"), cfg=SimpleNamespace(n=3)),
                         {"concepts": uneven, "r2": R2Accumulator(("a", "b"), (2, 2)),
                          "dict_norms": {m: torch.ones(3, dtype=torch.float64)
                                         for m in ("a", "b")}}, 0.5, "all", np.array([0]))
    assert rep2["concept_classes"]["model_specific"] == {"a": 2, "b": 1}
    ev._write(tmp_path / "w" / "x", rep1, rows1[:1], {"concepts": silent}, ("a",))
    assert (tmp_path / "w" / "x" / "concepts.csv").read_text().splitlines()[0].startswith("concept,")


def test_report_numbers_are_rounded_to_six_decimals(trained, tmp_path):
    root, _ = trained
    report = evaluate(root / "run", root / "store", tmp_path, progress=False, plots=False)
    for key in ("r2", "r2_paper", "mse"):
        for value in np.ravel(report[key]):
            assert value == round(value, 6)
    assert any(value != round(value, 5) for value in np.ravel(report["mse"]))


@pytest.mark.parametrize("key", ["aligned_grid", "spec", "keep_cls", "prefix_tokens"])
def test_every_recorded_store_setting_is_compared(trained, tmp_path, caplog, key):
    """Guards the settings eval compares between the training store and this one (each gives
    a warning naming both values), and runs whose record lacks a model (no warning)."""
    import shutil

    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["store"]["models"]["m0"][key] = "then"
    del cfg["store"]["models"]["m1"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(root / "store", tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    manifest["models"]["m0"][key] = "now"
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        evaluate(tmp_path / "run", tmp_path / "store", tmp_path / "e", progress=False,
                 plots=False)
    messages = [r.getMessage() for r in caplog.records]
    assert f"warning: model 'm0' was trained with {key}='then' but the store has 'now'" in \
        messages  # the whole message
    assert "'m1'" not in caplog.text


def test_eval_rows_fall_back_only_for_a_missing_val_split(make_arrays, tmp_path, caplog):
    """Guards the fallback: only `val`, only when the store has none, with its warning."""
    from usae.analysis.evaluate import eval_rows

    arrays = make_arrays(n_images=6, tokens=2, dims=(3,))
    with_val = store_from_arrays(tmp_path / "v", arrays, splits=["train"] * 4 + ["val"] * 2)
    rows, split = eval_rows(with_val, "val")
    assert rows.tolist() == [4, 5] and split == "val"
    no_val = store_from_arrays(tmp_path / "n", arrays, splits=["train"] * 5 + ["test"])
    with caplog.at_level("WARNING"):
        rows, split = eval_rows(no_val, "train")
        assert rows.tolist() == [0, 1, 2, 3, 4] and split == "train" and not caplog.text
        rows, split = eval_rows(no_val, "val")
    assert rows.tolist() == list(range(6)) and split == "all"
    assert caplog.messages == ["warning: the store has no 'val' split; evaluating on every image"]


def test_the_eval_report_is_read_and_written_in_one_place_with_its_sections_typed(tmp_path):
    from usae.analysis.eval_folder import REPORT_FILE, EvalReport, read_report, write_report

    data = {"models": ["a", "b"], "n_concepts": 8, "split": "val",
            "r2": [[1.0, 0.5], [0.4, None]], "l0": {"a": 3.0, "b": 2.0},
            "dead_fraction": {"a": 0.1, "b": 0.2}, "concept_classes": {"universal": 2},
            "summary": {"self_r2_mean": 0.95}, "jaccard": [[1.0, 0.2], [0.2, 1.0]],
            "run": {"path": "r", "step": 4}, "truth": {"recovery": {"a": 1.0}}}
    write_report(tmp_path, EvalReport(data))
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == data  # every key, as given
    r = read_report(tmp_path)
    assert (r.models, r.n_concepts, r.split, r.r2) == (["a", "b"], 8, "val", data["r2"])
    assert (r.l0, r.dead_fraction, r.concept_classes, r.summary) == (
        data["l0"], data["dead_fraction"], data["concept_classes"], data["summary"])
    assert r.run == {"path": "r", "step": 4} and r.truth == {"recovery": {"a": 1.0}}
    assert r.faithfulness is None, "a section the eval did not compute is None"
    assert r["jaccard"] == data["jaccard"] and dict(r) == data and r.to_json() == data
    changed = r.with_changes(top_images_split="all", run={})
    assert changed["top_images_split"] == "all" and changed.run == {}
    assert "top_images_split" not in r and r.run == data["run"], "the original is unchanged"
    old = EvalReport({k: v for k, v in data.items() if k not in ("n_concepts", "run")})
    assert old.n_concepts is None and old.run is None  # evals written before those keys
    assert EvalReport({**data, "run": "?"}).run is None
    (tmp_path / REPORT_FILE).write_text("[1, 2]")
    with pytest.raises(UsaeError, match="is not a usae eval report"):
        read_report(tmp_path)


def test_the_faithfulness_summary_is_the_mean_of_defined_cells_by_hand():
    """Self = the defined diagonal cells, cross = the defined off-diagonal cells (a cell is
    None where a model has no head); None where no cell is defined."""
    from usae.analysis.evaluate import faithfulness_summary

    kl = [[0.9, None, 0.2], [0.4, 0.7, None], [0.1, 0.3, None]]
    top1 = [[1.0, 0.5, 0.0], [0.25, None, 0.75], [0.5, 0.5, 0.5]]
    got = faithfulness_summary({"models": ["a", "b", "c"], "kl_recovered": kl,
                                "top1_agreement": top1})
    assert got == pytest.approx({
        "kl_recovered_self": (0.9 + 0.7) / 2, "kl_recovered_cross": (0.2 + 0.4 + 0.1 + 0.3) / 4,
        "top1_agreement_self": (1.0 + 0.5) / 2,
        "top1_agreement_cross": (0.5 + 0.0 + 0.25 + 0.75 + 0.5 + 0.5) / 6})
    one = faithfulness_summary({"kl_recovered": [[0.5]], "top1_agreement": [[None]]})
    assert one == {"kl_recovered_self": 0.5, "kl_recovered_cross": None,
                   "top1_agreement_self": None, "top1_agreement_cross": None}
    for nothing in (None, {}, {"models": ["a"], "skipped": "no head"}):
        assert faithfulness_summary(nothing) == {}
