"""usae.sae.training: the config a run resolves to, the checks before it starts, and what it
records, each built by hand (checkpoints written with save_checkpoint, no training), plus
short real runs where the wiring itself is the subject."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.conftest import exactly
from usae.config import resolve
from usae.data.sources import ArraySource
from usae.errors import ConfigMismatch, UsaeError
from usae.sae import training
from usae.sae.checkpoint import save_checkpoint
from usae.sae.training import (
    check_resume_data,
    resolve_run_config,
    resume_checkpoint,
    train_from_store,
    train_run,
    warn_if_too_short,
)
from usae.store.writer import store_from_arrays

MODELS, DIMS = ("a", "b"), (6, 4)




def _resolve(tmp_path, **kwargs):
    return resolve_run_config(MODELS, DIMS, tmp_path / "run", **kwargs)


def _checkpointed(tmp_path, preset="best", independent=False, **overrides):
    """A run folder holding only a checkpoint of the given config (what --resume reads)."""
    cfg = resolve(MODELS, DIMS, preset, {"n_concepts": 16, "k": 2, **overrides})
    path = resume_checkpoint(tmp_path / "run", MODELS, independent)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {}, {"step": 1}, cfg)
    return cfg


def test_resume_checkpoint_is_the_runs_or_the_first_models():
    assert str(resume_checkpoint("r", ("x", "y"), False)) == "r/checkpoint.safetensors"
    assert str(resume_checkpoint("r", ("x", "y"), True)) == "r/x/checkpoint.safetensors"


def test_the_layers_apply_in_order_preset_file_set_then_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.01, "k": 3, "seed": 7}))
    cfg = _resolve(tmp_path, preset="fast", config_file=str(tmp_path / "c.json"),
                   sets=["k=4", "n_concepts=32"], keys={"seed": 9}, max_steps=5,
                   device="cuda")
    assert cfg.preset == "fast" and cfg.sae.encoder == "linear"  # the preset's
    assert cfg.train.lr == 0.01  # the file's, over the preset's 3e-3
    assert cfg.sae.k == 4 and cfg.sae.n == 32  # --set over the file
    assert cfg.train.seed == 9  # a training-key flag over the file
    assert cfg.train.max_steps == 5 and cfg.train.device == "cuda"
    assert cfg.sae.models == MODELS and cfg.sae.dims == DIMS
    plain = _resolve(tmp_path)
    assert plain.preset == "paper" and plain == resolve(MODELS, DIMS, "paper")
    assert _resolve(tmp_path, max_steps=0, device="").train.max_steps == 0
    assert _resolve(tmp_path, device="").train.device == "cpu"  # an empty device: unset


def test_a_key_given_as_set_and_as_flag_must_agree(tmp_path):
    cfg = _resolve(tmp_path, sets=["lr=0.001"], keys={"lr": 1e-3})  # the same value, spelt
    assert cfg.train.lr == 1e-3
    with exactly("lr was given twice, as --set lr=0.002 and as --lr 0.001 — give it once"):
        _resolve(tmp_path, sets=["lr=0.002"], keys={"lr": 0.001})
    with exactly("batch_images was given twice, as --set batch_images=4 and as "
                "--batch-images 8 — give it once"):
        _resolve(tmp_path, sets=["batch_images=4"], keys={"batch_images": 8})


def test_resume_starts_from_the_checkpoints_config(tmp_path):
    saved = _checkpointed(tmp_path, preset="fast", lr=0.02, seed=3)
    cfg = _resolve(tmp_path, resume=True, max_steps=0, keys={"log_every": 3})
    assert cfg.preset == "fast" and cfg.train.lr == 0.02 and cfg.train.seed == 3
    assert cfg.train.log_every == 3 and cfg.sae == saved.sae
    assert _resolve(tmp_path, resume=True, preset="fast").train == saved.train
    with exactly(f"cannot resume with --preset paper: {tmp_path / 'run'} was trained with "
                "preset 'fast' — drop --preset, or train into a new folder", ConfigMismatch):
        _resolve(tmp_path, resume=True, preset="paper")
    with pytest.raises(ConfigMismatch, match=r"\(lr: 0\.02 -> 0\.5\)"):
        _resolve(tmp_path, resume=True, sets=["lr=0.5"])


def test_resume_of_independent_saes_compares_one_models_part(tmp_path):
    whole = resolve(MODELS, DIMS, "best", {"n_concepts": 16, "k": 2})
    part = training._independent_part(whole, 1)
    assert part.sae.models == ("b",) and part.sae.dims == (4,) and part.sae.n == 16
    assert part.train == whole.train and part.preset == whole.preset
    path = resume_checkpoint(tmp_path / "run", MODELS, True)
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {}, {}, training._independent_part(whole, 0))
    cfg = _resolve(tmp_path, resume=True, independent=True)
    assert cfg.sae.models == MODELS and cfg.sae.n == 16
    with pytest.raises(UsaeError, match="nothing to resume"):
        _resolve(tmp_path, resume=True, independent=False)  # RUN/ itself holds none


def test_the_default_n_of_independent_parts_is_the_whole_runs():
    whole = resolve(MODELS, DIMS, "paper", {"k": 2})  # n = 8 x max d = 48
    assert training._independent_part(whole, 1).sae.n_concepts == 48


def _run_json(tmp_path, **record):
    (tmp_path / "config.json").write_text(json.dumps({"sae": {}, **record}))


def test_check_resume_data_refuses_another_split_or_store(tmp_path):
    check_resume_data(tmp_path / "none", {"split": "val"})  # no config.json yet: unchecked
    _run_json(tmp_path, split="train", store={"content_hash": "a" * 64})
    check_resume_data(tmp_path, {"split": "train", "store": {"content_hash": "a" * 64}})
    check_resume_data(tmp_path, {})  # nothing recorded now: unchecked
    with exactly(f"cannot resume {tmp_path} on split 'val': it was trained on split 'train' — "
                "drop --split (or pass --split train)"):
        check_resume_data(tmp_path, {"split": "val"})
    with exactly(f"cannot resume {tmp_path} on other data: it was trained on the store with "
                f"content hash {'a' * 16}, not the store with content hash {'b' * 16} — pass "
                "the data it was trained on, or train into a new folder"):
        check_resume_data(tmp_path, {"store": {"content_hash": "b" * 64}})
    with exactly(f"cannot resume {tmp_path} on other data: it was trained on the store with "
                f"content hash {'a' * 16}, not the images of /photos — pass the data it was "
                "trained on, or train into a new folder"):
        check_resume_data(tmp_path, {"stream": {"source": "/photos"}})


def test_runs_that_recorded_no_data_are_not_checked(tmp_path):
    _run_json(tmp_path, store={"content_hash": None}, stream={})
    check_resume_data(tmp_path, {"split": "val", "store": {"content_hash": "b" * 64}})
    _run_json(tmp_path, stream={"source": "/photos"})
    check_resume_data(tmp_path, {"stream": {"source": "/photos"}})
    with pytest.raises(UsaeError, match="not the images of /other"):
        check_resume_data(tmp_path, {"stream": {"source": "/other"}})


def _source(n_images: int) -> ArraySource:
    return ArraySource({"a": np.zeros((n_images, 2, 6), np.float32),
                        "b": np.zeros((n_images, 2, 4), np.float32)})


@pytest.mark.parametrize("n_images, overrides, warned", [
    (8, {"batch_images": 4}, True),  # 2 steps, warmup one epoch = 2: inside the warmup
    (400, {"batch_images": 4, "warmup_steps": 10}, False),  # 100 steps after 10 of warmup
    (400, {"batch_images": 4, "warmup_steps": 100}, True),  # total == warmup
    (196, {"batch_images": 4, "warmup_steps": 10}, True),  # 49 steps < 50
    (200, {"batch_images": 4, "warmup_steps": 10}, False),  # exactly 50
    (8, {"batch_images": 4, "max_steps": 60, "warmup_steps": 5}, False),
    (3, {"batch_images": 4}, False),  # no full batch: the trainer says so itself
])
def test_a_run_too_short_to_mean_anything_warns(caplog, n_images, overrides, warned):
    cfg = resolve(MODELS, DIMS, "paper", {"n_concepts": 16, "k": 2, **overrides})
    with caplog.at_level(logging.WARNING, logger="usae.sae.training"):
        warn_if_too_short(cfg, _source(n_images))
    assert bool(caplog.messages) is warned


def test_the_short_run_warning_gives_its_numbers(caplog):
    cfg = resolve(MODELS, DIMS, "paper", {"n_concepts": 16, "k": 2, "batch_images": 4})
    with caplog.at_level(logging.WARNING, logger="usae.sae.training"):
        warn_if_too_short(cfg, _source(12))
    assert caplog.messages == [
        "warning: this run has only 3 steps (4 images a batch, 3 batches an epoch, "
        "learning-rate warmup 3 steps): too short to give a useful model — raise --epochs, "
        "--min-steps or --max-steps, or lower batch_images (the `demo` preset suits small "
        "stores)"]


def test_store_extra_describes_the_store_without_its_statistics():
    manifest = {"source": "/data/imagenet/train/", "content_hash": "abc",
                "images": [{"split": "train"}] * 3 + [{"split": "val"}],
                "models": {"a": {"d": 6, "stats": {"mean": 1}, "layer": "x"}}}
    assert training._store_extra(manifest) == {"store": {
        "content_hash": "abc", "source_description": "4 images from 'train' (train 3, val 1)",
        "models": {"a": {"d": 6, "layer": "x"}}}}
    del manifest["source"]
    assert training._store_extra(manifest)["store"]["source_description"] == \
        "4 images from 'in-memory arrays' (train 3, val 1)"
    assert training._store_extra(None) == {}


class RecordingDist:
    is_main, enabled, rank, world = True, False, 0, 1

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


def test_train_run_closes_only_the_process_group_it_opened(tmp_path, monkeypatch):
    opened, devices = RecordingDist(), []
    monkeypatch.setattr(training.Dist, "from_env",
                        classmethod(lambda cls, device: devices.append(device) or opened))
    monkeypatch.setattr(training, "_train_run", lambda *a, **k: {"ran": True})
    cfg = resolve(MODELS, DIMS, "paper", {"n_concepts": 16, "k": 2})
    assert train_run(cfg, _source(8), tmp_path / "r") == {"ran": True}
    assert opened.closed == 1
    assert devices == ["cpu"], "the job is joined for the run's device (nccl for cuda)"
    given = RecordingDist()
    train_run(cfg, _source(8), tmp_path / "r", dist=given)
    assert given.closed == 0 and opened.closed == 1

    def fail(*a, **k):
        raise RuntimeError("training broke")

    monkeypatch.setattr(training, "_train_run", fail)
    with pytest.raises(RuntimeError):
        train_run(cfg, _source(8), tmp_path / "r")
    assert opened.closed == 2  # closed on the way out of a failure too


@pytest.fixture
def small_store(make_arrays, tmp_path):
    arrays = make_arrays(n_images=16, tokens=2)
    return store_from_arrays(tmp_path / "store", arrays,
                             splits=["train"] * 12 + ["val"] * 4).path


def test_train_from_store_records_its_split_and_store(small_store, tmp_path):
    train_from_store(small_store, tmp_path / "run", max_steps=2, progress=False,
                     sets=["n_concepts=16", "k=2", "batch_images=4"])
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["split"] == "train" and record["status"]["state"] == "final"
    manifest = json.loads((small_store / "manifest.json").read_text())
    assert record["store"]["content_hash"] == manifest["content_hash"]
    assert record["store"]["source_description"].startswith("16 images from ")
    assert record["store"]["source_description"].endswith("(train 12, val 4)")


def test_eval_every_needs_a_val_split_or_warns(make_arrays, tmp_path, caplog, monkeypatch):
    arrays = make_arrays(n_images=8, tokens=2)
    only_train = store_from_arrays(tmp_path / "s", arrays, splits=["train"] * 8).path
    seen = {}
    monkeypatch.setattr(training, "train_run", lambda cfg, source, out, **kw: seen.update(
        kw, split=source.split) or {})
    with caplog.at_level(logging.WARNING, logger="usae.sae.training"):
        train_from_store(only_train, tmp_path / "r", sets=["eval_every=1"], progress=False)
    assert seen["val_source"] is None and seen["split"] == "train"
    assert "warning: the store has no val split, so the held-out R2 matrix is not logged" in \
        caplog.messages
    with_val = store_from_arrays(tmp_path / "v", arrays, splits=["train"] * 6 + ["val"] * 2).path
    train_from_store(with_val, tmp_path / "r2", sets=["eval_every=1"], progress=False,
                     split="val")
    assert seen["val_source"].split == "val" and seen["split"] == "val"
    assert seen["extra"] == {"split": "val"} and seen["store_manifest"]["models"]
    train_from_store(with_val, tmp_path / "r3", progress=False)
    assert seen["val_source"] is None  # eval_every=0: no held-out matrix asked


def test_independent_saes_train_one_folder_per_model(small_store, tmp_path):
    out = tmp_path / "ind"
    summary = train_from_store(small_store, out, max_steps=2, independent=True, progress=False,
                               sets=["n_concepts=16", "k=2", "batch_images=4"])
    models = json.loads((small_store / "manifest.json").read_text())["models"]
    assert set(summary["independent"]) == set(models) and summary["run"] == str(out)
    marker = json.loads((out / "independent.json").read_text())
    assert marker["models"] == list(models) and marker["split"] == "train"
    assert marker["config"]["sae"]["models"] == list(models)
    for m in models:
        sub = json.loads((out / m / "config.json").read_text())
        assert sub["sae"]["models"] == [m] and sub["sae"]["n_concepts"] == 16
        assert (out / m / "model.safetensors").exists()


# ---- what train_run hands the trainer, followed argument by argument ----------------------
class FakeTrainer:
    """Records how it was made and fitted; its summary names its folder."""

    made: list["FakeTrainer"] = []

    def __init__(self, cfg, out, **kwargs):
        self.cfg, self.out, self.kwargs, self.fitted = cfg, out, kwargs, None
        FakeTrainer.made.append(self)

    def fit(self, source, val_source=None, resume=False, force=False):
        self.fitted = {"source": source, "val": val_source, "resume": resume, "force": force}

    def summary(self):
        return {"run": str(self.out)}


@pytest.fixture
def fake_trainer(monkeypatch):
    FakeTrainer.made = []
    monkeypatch.setattr(training, "Trainer", FakeTrainer)
    return FakeTrainer.made


def _cfg3():
    return resolve(("a", "b", "c"), (6, 4, 5), "paper", {"n_concepts": 16, "k": 2})


def _source3(n=8):
    return ArraySource({m: np.zeros((n, 2, d), np.float32) for m, d in
                        (("a", 6), ("b", 4), ("c", 5))})


@pytest.mark.parametrize("resume, force", [(False, False), (True, False), (False, True)])
def test_a_universal_run_gives_the_trainer_every_argument(tmp_path, fake_trainer, resume,
                                                          force):
    cfg, source, val = _cfg3(), _source3(), _source3(4)
    dist, state = RecordingDist(), {"w": 1}
    got = training._train_run(cfg, source, tmp_path / "r", val, resume, force, False, False,
                              {"split": "train"}, dist, state)
    (t,) = fake_trainer
    assert got == {"run": str(tmp_path / "r")}
    assert (t.cfg, t.out) == (cfg, tmp_path / "r")
    assert t.kwargs == {"progress": False, "extra_config": {"split": "train"}, "dist": dist,
                        "initial_state": state}
    assert t.fitted == {"source": source, "val": val, "resume": resume, "force": force}


def test_independent_saes_each_get_their_model_alone(tmp_path, fake_trainer, caplog):
    cfg, source, val = _cfg3(), _source3(), _source3(4)
    dist = RecordingDist()
    with caplog.at_level(logging.INFO, logger="usae.sae.training"):
        got = training._train_run(cfg, source, tmp_path / "r", val, False, False, True, True,
                                  {"split": "train"}, dist)
    assert [t.out for t in fake_trainer] == [tmp_path / "r" / m for m in ("a", "b", "c")]
    for t, m in zip(fake_trainer, ("a", "b", "c")):
        assert t.cfg.sae.models == (m,) and t.cfg.sae.n == 16
        assert t.kwargs == {"progress": True, "extra_config": {"split": "train"}, "dist": dist}
        assert t.fitted["source"].models == (m,) and t.fitted["source"].source is source
        assert t.fitted["val"].models == (m,) and t.fitted["val"].source is val
        assert (t.fitted["resume"], t.fitted["force"]) == (False, False)
    assert got == {"run": str(tmp_path / "r"), "independent": {
        m: {"run": str(tmp_path / "r" / m)} for m in ("a", "b", "c")}}
    marker = json.loads((tmp_path / "r" / "independent.json").read_text())
    assert marker == {"models": ["a", "b", "c"], "config": json.loads(json.dumps(cfg.to_json())),
                      "split": "train"}
    assert caplog.messages == [f"independent SAE for {m}" for m in ("a", "b", "c")]


def test_an_independent_resume_continues_checkpointed_models_and_restarts_the_others(
        tmp_path, fake_trainer):
    out = tmp_path / "r"
    (out / "a").mkdir(parents=True)
    (out / "a" / "checkpoint.safetensors").write_text("")
    (out / "b").mkdir()
    (out / "b" / "model.safetensors").write_text("")
    training._train_run(_cfg3(), _source3(), out, None, True, False, True, False, {},
                        RecordingDist())
    flags = [(t.fitted["resume"], t.fitted["force"]) for t in fake_trainer]
    assert flags == [(True, False), (True, False), (False, True)]  # c had nothing to keep
    assert all(t.fitted["val"] is None for t in fake_trainer)
    training._train_run(_cfg3(), _source3(), out, None, True, True, True, False, {},
                        RecordingDist())
    assert [(t.fitted["resume"], t.fitted["force"]) for t in fake_trainer[3:]] == [
        (True, True), (True, True), (False, True)]


def test_a_fresh_independent_run_refuses_a_folder_it_did_not_write(tmp_path, fake_trainer):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "thesis.tex").write_text("")
    with pytest.raises(UsaeError, match="exists and is not empty"):
        training._train_run(_cfg3(), _source3(), tmp_path / "r", None, False, False, True,
                            False, {}, RecordingDist())
    assert fake_trainer == []
    training._train_run(_cfg3(), _source3(), tmp_path / "r", None, False, True, True, False,
                        {}, RecordingDist())  # --force: replaced
    assert [t.fitted["force"] for t in fake_trainer] == [True, True, True]


def test_other_ranks_neither_prepare_the_folder_nor_write_the_marker(tmp_path, fake_trainer):
    class Rank1(RecordingDist):
        is_main = False

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "thesis.tex").write_text("")  # rank 0 refuses it; rank 1 does not look
    training._train_run(_cfg3(), _source3(), tmp_path / "r", None, False, False, True, False,
                        {}, Rank1())
    assert len(fake_trainer) == 3 and not (tmp_path / "r" / "independent.json").exists()


def test_train_run_hands_every_argument_to_its_body(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(training, "_train_run", lambda *a: seen.update(args=a) or {"ok": 1})
    cfg, source, val, dist = _cfg3(), _source3(), _source3(4), RecordingDist()
    manifest = {"source": "/d/x", "content_hash": "h", "images": [{"split": "train"}],
                "models": {"a": {"d": 6}}}
    train_run(cfg, source, str(tmp_path / "r"), val_source=val, force=True, independent=True,
              progress=False, store_manifest=manifest, dist=dist, extra={"split": "train"},
              initial_state={"w": 2})
    assert seen["args"] == (cfg, source, tmp_path / "r", val, False, True, True, False, {
        **training._store_extra(manifest), "split": "train"}, dist, {"w": 2})


def test_a_resumed_run_checks_its_data_where_its_checkpoint_is(tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(training, "check_resume_data", lambda out, rec: checked.append(
        (out, rec)))
    monkeypatch.setattr(training, "_train_run", lambda *a: {})
    cfg = _cfg3()
    train_run(cfg, _source3(), tmp_path / "r", resume=True, dist=RecordingDist(),
              extra={"split": "val"})
    train_run(cfg, _source3(), tmp_path / "r", resume=True, independent=True,
              dist=RecordingDist())
    train_run(cfg, _source3(), tmp_path / "r", dist=RecordingDist())
    assert checked == [(tmp_path / "r", {"split": "val"}), (tmp_path / "r" / "a", {})]


def test_train_from_store_hands_every_argument_on(small_store, tmp_path, monkeypatch):
    seen = {}

    def resolve_spy(*args):
        seen["resolve"] = args
        return resolve(args[0], args[1], "paper", {"n_concepts": 16, "k": 2})

    monkeypatch.setattr(training, "resolve_run_config", resolve_spy)
    monkeypatch.setattr(training, "train_run", lambda cfg, source, out, **kw: seen.update(
        run=(cfg, source, out), kw=kw) or {"ok": 1})
    dist = RecordingDist()
    assert train_from_store(small_store, tmp_path / "r", preset="fast", config_file="c.json",
                            sets=["k=2"], keys={"lr": 0.1}, max_steps=7, device="cpu",
                            resume=True, force=True, split="val", independent=True,
                            progress=False, dist=dist) == {"ok": 1}
    store_models = tuple(json.loads((small_store / "manifest.json").read_text())["models"])
    assert seen["resolve"][0] == store_models and len(seen["resolve"][1]) == 3
    assert seen["resolve"][2:] == (tmp_path / "r", "fast", "c.json", ["k=2"], 7, "cpu", True,
                                   {"lr": 0.1}, True)
    assert seen["run"][2] == tmp_path / "r" and seen["run"][1].split == "val"
    kw = seen["kw"]
    assert (kw["resume"], kw["force"], kw["independent"], kw["progress"], kw["dist"]) == \
        (True, True, True, False, dist)
    assert kw["extra"] == {"split": "val"} and kw["store_manifest"]["models"]
    train_from_store(small_store, tmp_path / "r")  # the defaults
    kw = seen["kw"]
    assert (kw["resume"], kw["force"], kw["independent"], kw["progress"], kw["dist"]) == \
        (False, False, False, True, None)
    assert kw["extra"] == {"split": "train"} and seen["resolve"][2:] == (
        tmp_path / "r", None, None, None, None, None, False, None, False)


def test_train_run_defaults_are_a_fresh_run_with_a_progress_bar(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(training, "_train_run", lambda *a: seen.update(args=a) or {})
    cfg = _cfg3()
    train_run(cfg, _source3(), tmp_path / "r", dist=RecordingDist())
    (_, _, out, val, resume, force, independent, progress, extra, _, state) = seen["args"]
    assert (out, val, resume, force, independent, progress, extra, state) == (
        tmp_path / "r", None, False, False, False, True, {}, None)


def test_a_list_key_given_as_set_and_as_flag_agrees_when_equal(tmp_path):
    cfg = _resolve(tmp_path, sets=["matryoshka=8,16"], keys={"matryoshka": "8,16"})
    assert cfg.train.matryoshka == (8, 16)
