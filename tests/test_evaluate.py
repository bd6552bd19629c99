"""Every metric of ``usae eval`` against a naive dense computation on small random data."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from usae.config import resolve
from usae.errors import UsaeError
from usae.evaluate import evaluate
from usae.files import load_safetensors
from usae.sae import UniversalSAE
from usae.sources import StoreSource
from usae.store import Store
from usae.store_writer import store_from_arrays
from usae.training import train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_arrays):
    root = tmp_path_factory.mktemp("eval")
    arrays = make_arrays(n_images=40, tokens=4, dims=(12, 8, 10))
    store = store_from_arrays(root / "store", arrays, dtype="float32")
    cfg = resolve(store.models, store.dims, "demo", {"n_concepts": 24, "k": 3,
                                                     "batch_images": 4, "max_steps": 80})
    train_run(cfg, StoreSource(store, "train"), root / "run", progress=False,
              store_manifest=store.manifest)
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
                      batch_images=7, progress=False)
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
    from usae.controls import independent_consistency

    direct = independent_consistency(UniversalSAE.load(root / "run"), tmp_path / "independent")
    assert report["independent"] == direct
    rows = report["comparison"]
    assert [r["shuffle_pairing"] for r in rows] == [False, True]
    assert {"cross_r2_mean", "firing_entropy_median", "dead_fraction_mean"} <= set(rows[1])
