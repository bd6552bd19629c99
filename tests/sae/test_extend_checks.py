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
