"""usae.sae.extend's checks and its drift measure, on stores and runs written by hand (no
backbone, no training): each refusal with its message, and the drift against cosines
computed here."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import exactly
from usae.config import resolve
from usae.sae import extend
from usae.sae.model import UniversalSAE
from usae.sae.run import final_status, write_config
from usae.store.store import Store
from usae.store.writer import store_from_arrays


@pytest.fixture
def store(make_arrays, tmp_path):
    """A store of m0 (d 12), m1 (d 8) and m2 (d 10)."""
    return store_from_arrays(tmp_path / "store", make_arrays(n_images=8, tokens=2))


def _run(tmp_path, models, dims, store_record=None):
    cfg = resolve(tuple(models), tuple(dims), "paper", {"n_concepts": 16, "k": 2})
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    extra = {} if store_record is None else {"store": store_record}
    write_config(run, cfg, final_status(), extra)
    return run, cfg


def test_the_new_models_are_the_stores_models_the_run_lacks(store, tmp_path):
    run, cfg = _run(tmp_path, ["m0", "m1"], [12, 8],
                    {"content_hash": store.manifest["content_hash"]})
    assert extend.check_extendable(run, cfg, store) == ["m2"]
    run, cfg = _run(tmp_path, ["m1"], [8], {"content_hash": store.manifest["content_hash"]})
    assert extend.check_extendable(run, cfg, store) == ["m0", "m2"]  # in the store's order


def test_a_store_without_the_runs_models_is_refused(store, tmp_path):
    run, cfg = _run(tmp_path, ["m0", "x", "y"], [12, 4, 4])
    with exactly("the store lacks the run's model(s) ['x', 'y'] — extend with a store that has "
                "them (usae store add-model adds the new ones to it)"):
        extend.check_extendable(run, cfg, store)


def test_nothing_to_add_or_finetune_with_new_models_is_refused(store, tmp_path):
    run, cfg = _run(tmp_path, ["m0", "m1", "m2"], [12, 8, 10])
    with exactly("the store has no model the run lacks (both have ['m0', 'm1', 'm2']) — add one "
                "with `usae store add-model STORE --models SPEC`"):
        extend.check_extendable(run, cfg, store)
    assert extend.check_extendable(run, cfg, store, finetune=True) == []
    run, cfg = _run(tmp_path, ["m0"], [12])
    with exactly("--finetune trains a run on its own models, but the store has ['m1', 'm2'] "
                "too — extend the run with them first (--extend without --finetune)"):
        extend.check_extendable(run, cfg, store, finetune=True)


def test_a_width_that_differs_is_refused(store, tmp_path):
    run, cfg = _run(tmp_path, ["m0", "m1"], [12, 9])
    with exactly("model 'm1': the run has d=9 but the store has d=8"):
        extend.check_extendable(run, cfg, store)


def test_other_images_are_refused_and_an_earlier_hash_accepted(store, tmp_path, caplog):
    run, cfg = _run(tmp_path, ["m0"], [12], {"content_hash": "f" * 64})
    with exactly(f"the store's images differ from those the run was trained on (its store had "
                f"content hash {'f' * 16}) — add the new model to the run's own store with "
                "`usae store add-model`"):
        extend.check_extendable(run, cfg, store)
    manifest = dict(store.manifest, history=[{"previous_content_hash": "f" * 64}])
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    assert extend.check_extendable(run, cfg, Store(store.path)) == ["m1", "m2"]
    run, cfg = _run(tmp_path, ["m0"], [12])  # no record of its store: a warning
    with caplog.at_level(logging.WARNING, logger="usae.sae.extend"):
        extend.check_extendable(run, cfg, Store(store.path))
    assert caplog.messages == [f"warning: {run} does not record its store, so the images "
                               "cannot be checked to be the ones it was trained on"]


def test_a_new_model_without_statistics_is_refused(store, tmp_path):
    manifest = dict(store.manifest)
    manifest["stats"] = {k: v for k, v in manifest["stats"].items() if k != "m2"}
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    run, cfg = _run(tmp_path, ["m0"], [12], {"content_hash": manifest["content_hash"]})
    with exactly("the store has no standardization statistics for ['m2'] — re-create it with "
                "usae cache or usae store add-model"):
        extend.check_extendable(run, cfg, Store(store.path))


def test_extend_refuses_a_preset(store, tmp_path):
    with exactly("--extend keeps the run's own config; give single keys (--lr, --max-steps...) "
                "instead of --preset"):
        extend.extend_run(tmp_path / "run", store.path, tmp_path / "out", preset="fast")


def _sae(seed):
    cfg = resolve(("a", "b"), (6, 4), "paper", {"n_concepts": 10, "k": 2})
    torch.manual_seed(seed)
    return UniversalSAE(cfg.sae)


def test_concept_drift_is_the_cosine_of_each_dictionary_row(tmp_path):
    before, after = _sae(0), _sae(0)
    with torch.no_grad():
        after.dictionaries["a"][:3] *= -1  # three concepts reversed: cosine -1
        after.dictionaries["b"][:] *= 2.5  # scaled: cosine 1 (rows are normalized)
    drift = extend.concept_drift(before, after)
    assert drift == {"a": {"mean_cosine": round((7 - 3) / 10, 4), "moved_fraction": 0.3},
                     "b": {"mean_cosine": 1.0, "moved_fraction": 0.0}}
    other = _sae(1)
    a0 = torch.nn.functional.normalize(before.dictionaries["a"].detach(), dim=1)
    a1 = torch.nn.functional.normalize(other.dictionaries["a"].detach(), dim=1)
    cos = (a0 * a1).sum(1)
    got = extend.concept_drift(before, other)["a"]
    assert got["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-4)
    assert got["moved_fraction"] == pytest.approx(float((cos < 0.9).float().mean()))
    assert extend.write_drift(before, after, tmp_path) == drift
    saved = json.loads((tmp_path / "concept_drift.json").read_text())
    assert saved == {"measure": "cosine of each concept's dictionary row before and after "
                                "fine-tuning; moved: below 0.9", "models": drift}
    assert extend.DRIFT_FILE == "concept_drift.json"


# ---- extend_run: each argument followed to train_run / train_from_store ---------------------
@pytest.fixture
def trained(make_arrays, tmp_path):
    """A store of m0, m1, m2 with a val split, and a saved run of m0 and m1 (step 7 of 9)
    that records it."""
    arrays = make_arrays(n_images=8, tokens=2)
    store = store_from_arrays(tmp_path / "vstore", arrays,
                              splits=["train"] * 6 + ["val"] * 2)
    cfg = resolve(("m0", "m1"), (12, 8), "paper", {"n_concepts": 16, "k": 2, "max_steps": 9,
                                                   "eval_every": 3})
    torch.manual_seed(0)
    sae = UniversalSAE(cfg.sae)
    run = tmp_path / "trained"
    sae.save(run)
    write_config(run, cfg, final_status(7, 9),
                 {"store": {"content_hash": store.manifest["content_hash"]}})
    return store, run, cfg, sae


@pytest.fixture
def recorded(monkeypatch):
    """extend's train_run and train_from_store replaced by recorders; each writes the run
    it was given (or the extended SAE, with its dictionaries moved) so drift can read it."""
    calls: dict[str, list] = {"train_run": [], "train_from_store": []}

    def train_run(cfg, source, out, **kw):
        calls["train_run"].append({"cfg": cfg, "source": source, "out": out, **kw})
        sae = UniversalSAE(cfg.sae)
        sae.load_state_dict(kw["initial_state"], strict=False)
        with torch.no_grad():
            sae.dictionaries["m0"][:4] *= -1
        sae.save(out, cfg)
        return {"steps": 1}

    def train_from_store(store_path, out, **kw):
        calls["train_from_store"].append({"store": store_path, "out": out, **kw})
        return {"steps": 2}

    monkeypatch.setattr(extend, "train_run", train_run)
    monkeypatch.setattr(extend, "train_from_store", train_from_store)
    return calls


def test_extend_trains_the_new_model_from_the_run_with_its_record(trained, recorded, tmp_path,
                                                                  caplog, monkeypatch):
    import re
    import time

    from usae.analysis.eval_folder import weights_digest

    monkeypatch.setenv("TZ", "Asia/Tokyo")  # the record's time is UTC whatever the zone
    time.tzset()
    store, run, cfg, sae = trained
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="usae.sae.extend"):
        summary = extend.extend_run(run, store.path, out, sets=["lr=0.002"], keys={"k": 3},
                                    max_steps=5, device="cpu")
    assert summary == {"steps": 1} and not (out / "concept_drift.json").exists()
    assert caplog.messages == [f"extending {run} -> {out}"]
    [call] = recorded["train_run"]
    new = call["cfg"]
    assert (new.sae.models, new.sae.dims, new.train.frozen_models) == \
        (("m0", "m1", "m2"), (12, 8, 10), ("m0", "m1"))
    assert (new.sae.k, new.train.lr, new.train.max_steps, new.preset) == \
        (3, 0.002, 5, cfg.preset)
    assert new.train.eval_every == 3 and new.sae.n_concepts == 16  # the run's own keys
    assert call["source"].split == "train" and call["val_source"].split == "val"
    assert (call["out"], call["force"], call["progress"], call["dist"]) == (out, False, True,
                                                                            None)
    assert call["store_manifest"] == store.manifest
    for key, value in sae.state_dict().items():
        assert torch.equal(call["initial_state"][key], value)
    record = call["extra"]
    at = record["extended_from"].pop("at")
    assert record == {"split": "train", "extended_from": {
        "run": str(run), "step": 7, "weights_sha256": weights_digest(run), "added": ["m2"],
        "finetune": False}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", at)
    try:
        assert abs(time.mktime(time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")) -
                   time.mktime(time.gmtime())) < 120
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_extend_keeps_the_runs_steps_and_holds_out_only_when_it_evaluates(trained, recorded,
                                                                         tmp_path):
    store, run, cfg, _ = trained
    extend.extend_run(run, store.path, tmp_path / "a", split="val", force=True,
                      progress=False, sets=["eval_every=0"])
    call = recorded["train_run"][-1]
    assert call["cfg"].train.max_steps == 9 and call["val_source"] is None
    assert (call["source"].split, call["extra"]["split"], call["force"], call["progress"]) == \
        ("val", "val", True, False)
    no_val = store_from_arrays(tmp_path / "trainonly", {m: store.read(m, store.rows("all"))
                                                        .numpy() for m in store.models},
                               splits=["train"] * 8)
    manifest = dict(no_val.manifest, content_hash=store.manifest["content_hash"])
    (no_val.path / "manifest.json").write_text(json.dumps(manifest))
    extend.extend_run(run, no_val.path, tmp_path / "b")
    assert recorded["train_run"][-1]["val_source"] is None  # eval_every 3, but no val split


def test_finetune_writes_the_drift_on_the_main_process_only(trained, recorded, tmp_path,
                                                            caplog):
    from usae.distributed import Dist

    store, run, cfg, sae = trained
    full = tmp_path / "full"
    every = resolve(("m0", "m1", "m2"), (12, 8, 10), "paper", {"n_concepts": 16, "k": 2})
    torch.manual_seed(1)
    UniversalSAE(every.sae).save(full)
    write_config(full, every, final_status(3, 3),
                 {"store": {"content_hash": store.manifest["content_hash"]}})
    with caplog.at_level(logging.INFO, logger="usae.sae.extend"):
        summary = extend.extend_run(full, store.path, tmp_path / "ft", finetune=True)
    assert caplog.messages == [f"fine-tuning every model of {full} -> {tmp_path / 'ft'}"]
    call = recorded["train_run"][-1]
    assert call["cfg"].train.frozen_models == () and call["extra"]["extended_from"][
        "finetune"] is True and call["extra"]["extended_from"]["added"] == []
    want = extend.concept_drift(UniversalSAE.load(full), UniversalSAE.load(tmp_path / "ft"))
    assert summary["concept_drift"] == want and want["m0"]["moved_fraction"] == 0.25
    assert json.loads((tmp_path / "ft" / "concept_drift.json").read_text())["models"] == want
    rank1 = extend.extend_run(full, store.path, tmp_path / "ft1", finetune=True,
                              dist=Dist(1, 2))
    assert "concept_drift" not in rank1 and not (tmp_path / "ft1" / "concept_drift.json") \
        .exists()
    assert recorded["train_run"][-1]["dist"] == Dist(1, 2)


def test_resume_is_train_from_store_with_every_argument(trained, recorded, tmp_path):
    from usae.distributed import Dist

    store, run, _, _ = trained
    out = tmp_path / "ft"
    UniversalSAE.load(run).save(out, extend.run_folder.read_config(run))
    summary = extend.extend_run(run, store.path, out, resume=True, config_file="c.json",
                                sets=["lr=0.1"], keys={"k": 2}, max_steps=4, device="cpu",
                                split="val", progress=False, force=True, dist=Dist(1, 2),
                                finetune=True)
    assert recorded["train_from_store"] == [{
        "store": store.path, "out": out, "config_file": "c.json", "sets": ["lr=0.1"],
        "keys": {"k": 2}, "max_steps": 4, "device": "cpu", "resume": True, "force": True,
        "split": "val", "progress": False, "dist": Dist(1, 2)}]
    assert summary == {"steps": 2}  # rank 1: no drift
    defaults = extend.extend_run(run, store.path, out, resume=True)
    assert recorded["train_from_store"][-1]["force"] is False
    assert recorded["train_from_store"][-1]["progress"] is True
    assert "concept_drift" not in defaults  # not a fine-tune
    drifted = extend.extend_run(run, store.path, out, resume=True, finetune=True)
    assert drifted["concept_drift"] == extend.concept_drift(UniversalSAE.load(run),
                                                           UniversalSAE.load(out))


def test_a_store_with_no_statistics_at_all_is_refused(store, tmp_path):
    manifest = {k: v for k, v in store.manifest.items() if k != "stats"}
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    run, cfg = _run(tmp_path, ["m0"], [12], {"content_hash": manifest["content_hash"]})
    with exactly("the store has no standardization statistics for ['m1', 'm2'] — re-create it "
                 "with usae cache or usae store add-model"):
        extend.check_extendable(run, cfg, Store(store.path))


def test_a_run_that_records_its_store_is_not_warned_about(store, tmp_path, caplog):
    run, cfg = _run(tmp_path, ["m0"], [12], {"content_hash": store.manifest["content_hash"]})
    with caplog.at_level(logging.WARNING, logger="usae.sae.extend"):
        extend.check_extendable(run, cfg, store)
    assert caplog.messages == []


def test_drift_is_rounded_to_four_places(tmp_path):
    before, other = _sae(0), _sae(3)
    a0 = torch.nn.functional.normalize(before.dictionaries["b"].detach(), dim=1)
    a1 = torch.nn.functional.normalize(other.dictionaries["b"].detach(), dim=1)
    cos = (a0 * a1).sum(1)
    got = extend.concept_drift(before, other)["b"]
    assert got["mean_cosine"] == round(float(cos.mean()), 4)
    assert got["moved_fraction"] == round(float((cos < 0.9).float().mean()), 4) == 1.0
    before.dictionaries["b"].data[:7] = other.dictionaries["b"].data[:7]
    assert extend.concept_drift(before, other)["b"]["moved_fraction"] == round(3 / 10, 4)
    seven = resolve(("a", "b"), (6, 4), "paper", {"n_concepts": 7, "k": 2})
    first, second = UniversalSAE(seven.sae), UniversalSAE(seven.sae)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        second.dictionaries["a"][0] *= -1  # one concept of seven moved
    assert extend.concept_drift(first, second)["a"]["moved_fraction"] == round(1 / 7, 4)
