"""The command handlers (usae.commands): what each prints after its library call, and the
checks it makes before one. The library is replaced by stand-ins that return hand-made
results, so every printed number is compared with the number given here. (The wiring of
flags into the library is tests/test_cli.py's WIRING table.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import exactly
from usae import commands
from usae.cli import build_parser
from usae.errors import UsaeError


def _args(*argv: str):
    return build_parser().parse_args(list(argv))




# ---- .npy in and out --------------------------------------------------------------------
def test_load_npy_reads_numeric_arrays(tmp_path):
    for dtype in (np.float32, np.float16, np.int64, np.uint8, np.bool_):
        np.save(tmp_path / "x.npy", np.ones((2, 3), dtype))
        got = commands._load_npy(str(tmp_path / "x.npy"))
        assert got.dtype == dtype and got.shape == (2, 3)


def test_load_npy_refuses_what_is_not_a_numeric_npy(tmp_path):
    with exactly(f"{tmp_path / 'none.npy'} does not exist"):
        commands._load_npy(str(tmp_path / "none.npy"))
    with exactly(f"cannot read {tmp_path}: Is a directory"):
        commands._load_npy(str(tmp_path))
    (tmp_path / "t.npy").write_text("1,2,3")
    with exactly(f"{tmp_path / 't.npy'} is not a .npy file (no NumPy header) — save arrays "
                "with numpy.save"):
        commands._load_npy(str(tmp_path / "t.npy"))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with exactly(f"{tmp_path / 'o.npy'} holds Python objects (a pickled array); usae reads "
                "only numeric .npy files — save it with a float dtype"):
        commands._load_npy(str(tmp_path / "o.npy"))
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with exactly(f"{tmp_path / 's.npy'} has dtype <U1; expected a numeric (float or integer) "
                "array"):
        commands._load_npy(str(tmp_path / "s.npy"))
    np.save(tmp_path / "c.npy", np.zeros(3, np.complex64))
    with pytest.raises(UsaeError, match="has dtype complex64"):
        commands._load_npy(str(tmp_path / "c.npy"))
    good = (tmp_path / "f.npy")
    np.save(good, np.zeros((100, 10), np.float32))
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:300])
    with pytest.raises(UsaeError, match=r"cut\.npy is not a .npy array \(|cut\.npy is not a "
                                        r"readable .npy array \("):
        commands._load_npy(str(tmp_path / "cut.npy"))


def test_load_npy_reports_a_bad_header_as_not_an_array(tmp_path):
    (tmp_path / "h.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\x10\x00" + b"{garbage}      \n")
    with pytest.raises(UsaeError, match=r"^.*h\.npy is not a \.npy array \(.*\) — save it with "
                                        r"numpy\.save$"):
        commands._load_npy(str(tmp_path / "h.npy"))


def test_save_npy_writes_atomically(tmp_path):
    commands._save_npy(str(tmp_path / "o" / "z.npy"), np.arange(6, dtype=np.float32))
    assert np.load(tmp_path / "o" / "z.npy").tolist() == [0, 1, 2, 3, 4, 5]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["z.npy"]


# ---- encode / decode --------------------------------------------------------------------
class FakeSAE:
    def __init__(self):
        self.calls = []

    def index(self, model):
        self.calls.append(("index", model))

    def encode(self, model, x):
        self.calls.append(("encode", model, x.dtype, tuple(x.shape)))
        return x.repeat(1, 2)  # (n, 2d): a code of its own width

    def decode(self, model, z):
        self.calls.append(("decode", model, z.dtype, tuple(z.shape)))
        return z[:, :1] * 3


@pytest.fixture
def fake_sae(monkeypatch):
    sae = FakeSAE()
    loaded = []
    from usae.sae.model import UniversalSAE

    monkeypatch.setattr(UniversalSAE, "load", classmethod(
        lambda cls, run, device="cpu": loaded.append((run, device)) or sae))
    sae.loaded = loaded
    return sae


@pytest.mark.parametrize("command, shape, what", [("encode", (4, 6), "codes"),
                                                   ("decode", (4, 1), "activations")])
def test_encode_and_decode_write_float32_and_say_the_shape(tmp_path, fake_sae, capsys,
                                                           command, shape, what):
    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.float64).reshape(4, 3))
    flag = "--input" if command == "encode" else "--codes"
    args = _args(command, "RUN", "--model", "m", flag, str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "y.npy"))
    handler = commands.cmd_encode if command == "encode" else commands.cmd_decode
    assert handler(args) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'y.npy'}: {what} {shape} float32\n"
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == shape
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    expected = np.tile(x, 2) if command == "encode" else x[:, :1] * 3
    np.testing.assert_array_equal(y, expected)
    assert fake_sae.loaded == [("RUN", "cpu")]
    assert fake_sae.calls[0] == ("index", "m")
    assert fake_sae.calls[1][1:] == ("m", torch.float32, (4, 3))


def test_encode_checks_the_device_first(tmp_path, fake_sae):
    args = _args("encode", "RUN", "--model", "m", "--input", "x.npy", "--out", "y.npy",
                 "--device", "tpu")
    with exactly("--device must be cpu or cuda[:i], got 'tpu'"):
        commands.cmd_encode(args)
    assert fake_sae.loaded == []


# ---- store ------------------------------------------------------------------------------
def test_store_info_prints_the_stores_info_as_json(monkeypatch, capsys):
    from usae.store import store

    class FakeStore:
        def __init__(self, path):
            self.path = path

        def info(self):
            return {"path": self.path, "n_images": 3}

    monkeypatch.setattr(store, "Store", FakeStore)
    assert commands.cmd_store(_args("store", "info", "S")) == 0
    assert capsys.readouterr().out == '{\n  "path": "S",\n  "n_images": 3\n}\n'


def test_store_merge_says_how_many_images_and_shards(monkeypatch, capsys):
    from usae.store import merge

    seen = {}
    monkeypatch.setattr(merge, "merge_shards", lambda shards, out, force: seen.update(
        shards=shards, out=out, force=force) or {"n_images": 70, "content_hash": "f" * 64})
    assert commands.cmd_store(_args("store", "merge", "a", "b", "c", "--out", "M")) == 0
    assert capsys.readouterr().out == f"wrote M: 70 images from 3 shards, content hash " \
                                      f"{'f' * 16}\n"
    assert seen == {"shards": ["a", "b", "c"], "out": "M", "force": False}


def test_store_import_npz_splits_the_model_list(monkeypatch, capsys):
    from usae.store import npz_import

    seen = {}
    monkeypatch.setattr(npz_import, "import_npz", lambda src, out, models, split, dtype:
                        seen.update(models=models, split=split, dtype=dtype) or {"n_images": 9})
    args = _args("store", "import-npz", "SRC", "--out", "N", "--models", " a, b,,c ")
    assert commands.cmd_store(args) == 0
    assert seen["models"] == ["a", "b", "c"]
    assert capsys.readouterr().out == "wrote N: 9 images, models ['a', 'b', 'c']\n"


def test_store_add_model_passes_the_image_options_but_not_the_stores_own(monkeypatch,
                                                                         capsys):
    from usae.data import store_add
    from usae.options import STORE_KEEPS

    seen = {}

    def add_models(store, models, options, progress):
        seen.update(store=store, models=models, options=options, progress=progress)
        return {"models": {"a": {}, "b": {}}, "n_images": 12, "content_hash": "0123" * 16}

    monkeypatch.setattr(store_add, "add_models", add_models)
    args = _args("store", "add-model", "S", "--models", "b", "--batch-size", "3",
                 "--no-progress")
    assert commands.cmd_store(args) == 0
    assert capsys.readouterr().out == "S: models ['a', 'b'], 12 images, content hash " \
                                      "0123012301230123\n"
    assert seen["options"].batch_size == 3 and seen["progress"] is False
    assert seen["store"] == "S" and seen["models"] == "b"
    defaults = type(seen["options"])()
    for key in STORE_KEEPS:  # the store's own settings are not taken from the flags
        assert getattr(seen["options"], key) == getattr(defaults, key)
    from usae import distributed

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)  # another rank
    assert commands.cmd_store(args) == 0 and capsys.readouterr().out == ""


def test_store_without_a_subcommand_says_which_exist():
    with exactly("a store command is needed — usage: usae store "
                "{info,merge,import-npz,add-model} ..."):
        commands.cmd_store(_args("store"))


# ---- train ------------------------------------------------------------------------------
SUMMARY = {"run": "R", "steps": 120, "tokens": 1234567, "elapsed_s": 12.345,
           "tokens_per_s": 100007, "loss": 0.123456, "recon": {"a": 0.05, "b": 0.25},
           "val_r2": [[0.9, 0.3], [0.5, 0.7]]}


def test_the_train_summary_states_each_figure():
    assert commands._train_summary(SUMMARY).split("\n") == [
        "wrote R: config.json, model.safetensors, metrics.jsonl, checkpoint",
        "  120 steps, 1,234,567 tokens in 12.3s (100,007 tokens/s)",
        "  last logged loss 0.1235 (reconstruction: a 0.0500, b 0.2500)",
        "  held-out R2: self 0.800, cross 0.400"]


def test_the_train_summary_of_one_model_fine_tuning_and_independent_runs():
    one = {**SUMMARY, "val_r2": [[0.8]], "loss": None,
           "concept_drift": {"c": {"mean_cosine": 0.9512, "moved_fraction": 0.125}}}
    assert commands._train_summary(one).split("\n")[1:] == [
        "  120 steps, 1,234,567 tokens in 12.3s (100,007 tokens/s)",
        "  c: concepts moved by fine-tuning: mean cosine to before 0.951, 12.5% below 0.9",
        "  held-out R2: self 0.800"]
    none = {**SUMMARY, "val_r2": None, "recon": None}
    assert commands._train_summary(none).split("\n")[2:] == [
        "  last logged loss 0.1235 (reconstruction: )"]
    assert commands._train_summary({"run": "R", "independent": {"a": {}, "b": {}}}) == \
        "wrote R: one independent SAE per model (a, b)"


@pytest.fixture
def train_calls(monkeypatch):
    from usae.data import streaming
    from usae.sae import extend, training

    calls = []
    monkeypatch.setattr(training, "train_from_store", lambda store, out, **kw: calls.append(
        ("store", store, out, kw)) or SUMMARY)
    monkeypatch.setattr(streaming, "train_from_images", lambda images, models, out, opts, **kw:
                        calls.append(("images", images, models, out, opts, kw)) or SUMMARY)
    monkeypatch.setattr(extend, "extend_run", lambda run, store, out, finetune, **kw:
                        calls.append(("extend", run, store, out, finetune, kw)) or SUMMARY)
    monkeypatch.delenv("RANK", raising=False)
    return calls


def test_train_from_a_store_prints_the_summary(train_calls, capsys):
    assert commands.cmd_train(_args("train", "--store", "S", "--out", "R", "--lr", "0.01",
                                    "--max-steps", "5", "--no-progress")) == 0
    assert capsys.readouterr().out == commands._train_summary(SUMMARY) + "\n"
    (kind, store, out, kw), = train_calls
    assert (kind, store, out) == ("store", "S", "R") and kw["independent"] is False
    assert kw["keys"] == {"lr": 0.01, "max_steps": 5}  # (max_steps is a training key too)
    assert kw["max_steps"] == 5 and kw["progress"] is False
    assert kw["split"] == "train" and kw["resume"] is False and kw["force"] is False


def test_train_on_rank_1_prints_nothing(train_calls, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    commands.cmd_train(_args("train", "--store", "S", "--out", "R"))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "R"], "give either --store (a cached store) or --images with --models "
                              "(activations computed on the fly)"),
    (["train", "--store", "S", "--images", "I", "--out", "R"],
     "give either --store (a cached store) or --images with --models (activations computed "
     "on the fly)"),
    (["train", "--store", "S", "--out", "R", "--workers", "4", "--keep-cls"],
     "--workers, --keep-cls: image options apply with --images; a store was cached with its "
     "own"),
    (["train", "--images", "I", "--out", "R"], "--images needs --models SPEC[,SPEC...]"),
    (["train", "--images", "I", "--models", "m", "--out", "R", "--independent"],
     "--independent needs a store: usae cache, then train --store"),
    (["train", "--store", "S", "--out", "R", "--finetune"],
     "--finetune goes with --extend RUN (the run whose weights to train)"),
    (["train", "--images", "I", "--models", "m", "--out", "R", "--extend", "E"],
     "--extend needs --store (a store with the run's models and the new ones) and trains one "
     "universal SAE (no --independent)"),
    (["train", "--store", "S", "--out", "R", "--extend", "E", "--independent"],
     "--extend needs --store (a store with the run's models and the new ones) and trains one "
     "universal SAE (no --independent)"),
])
def test_train_refuses_contradictory_flags_before_any_work(train_calls, argv, message):
    with exactly(message):
        commands.cmd_train(_args(*argv))
    assert train_calls == []


def test_train_from_images_and_extend_reach_their_entry_points(train_calls):
    commands.cmd_train(_args("train", "--images", "I", "--models", "a,b", "--out", "R",
                             "--shuffle-buffer", "7"))
    kind, images, models, out, opts, kw = train_calls[-1]
    assert (kind, images, models, out) == ("images", "I", "a,b", "R")
    assert opts.shuffle_buffer == 7 and "independent" not in kw
    assert opts.stats_images == type(opts)().stats_images  # not given: the default
    commands.cmd_train(_args("train", "--store", "S", "--out", "R", "--extend", "E",
                             "--finetune"))
    kind, run, store, out, finetune, kw = train_calls[-1]
    assert (kind, run, store, out, finetune) == ("extend", "E", "S", "R", True)


# ---- cache ------------------------------------------------------------------------------
def test_cache_prints_the_store_or_the_shard_and_how_to_merge(monkeypatch, capsys):
    from usae.data import cache

    result = {"n_images": 10, "models": {"a": {}, "b": {}},
              "images": [{"skipped": True}, {}, {"skipped": False}, {"skipped": True}]}
    monkeypatch.setattr(cache, "cache", lambda models, images, out, options: result)
    monkeypatch.delenv("RANK", raising=False)
    assert commands.cmd_cache(_args("cache", "--models", "a,b", "--images", "I", "--out",
                                    "S")) == 0
    assert capsys.readouterr().out == "wrote S: 10 images (2 skipped), models ['a', 'b']\n"
    result["shard"] = {"index": 2, "count": 4}
    assert commands.cmd_cache(_args("cache", "--models", "a,b", "--images", "I", "--out", "S",
                                    "--shard-dir", "SH")) == 0
    assert capsys.readouterr().out == ("wrote shard 2 of 4 in SH; once every rank is done, "
                                       "join the shards with: usae store merge SH/shard-* "
                                       "--out S\n")
    monkeypatch.setenv("RANK", "3")
    assert commands.cmd_cache(_args("cache", "--models", "a", "--images", "I", "--out", "S")) \
        == 0
    assert capsys.readouterr().out == ""


# ---- demo -------------------------------------------------------------------------------
def test_demo_prints_each_output_it_made(monkeypatch, capsys, tmp_path):
    from usae import demo

    out = tmp_path / "d"
    res = {"timings": {"total_s": 61.4, "images_s": 2.2, "cache_s": 10.6, "train_s": 40.0},
           "report": "EV", "r2": [[0.9, 0.2], [0.4, 0.7]],
           "faithfulness": {"models": ["a"]},
           "cam": {7: {"concept": 7, "self_ratio": {"a": 1.25, "b": 0.5},
                       "transfer_offdiag_mean": 0.333, "transfer_control_offdiag_mean": 0.1}},
           "cam_s": 5.4, "explorer": "X/index.html"}
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(kw) or res)
    from usae.analysis import faithfulness

    monkeypatch.setattr(faithfulness, "format_table", lambda section: f"  <{section}>")
    assert commands.cmd_demo(_args("demo", "--out", str(out), "--quick")) == 0
    assert seen["quick"] is True
    assert capsys.readouterr().out.split("\n") == [
        "", "usae demo finished in 61s (images 2s, cache 11s, train 40s)",
        f"  store:    {out / 'store'}   (usae store info {out / 'store'})",
        f"  run:      {out / 'run'}     (metrics.jsonl, model.safetensors)",
        "  eval:     EV   held-out R2: self 0.80, cross 0.30",
        "  <{'models': ['a']}>",
        f"  cam:      {out / 'run' / 'cam'}   concepts [7] in 5s; concept 7: self score 1.2, "
        "0.5, transfer 0.33 vs frequency-matched control 0.10 (robust scores: 1 = the natural "
        "top 1 %)",
        f"  explorer: open X/index.html in a browser, or: usae serve {out / 'explorer'}", ""]


def test_a_demo_of_one_model_without_eval_or_cam_prints_the_basics(monkeypatch, capsys,
                                                                   tmp_path):
    from usae import demo

    res = {"timings": {"total_s": 1, "images_s": 0, "cache_s": 0, "train_s": 1},
           "report": "EV", "r2": [[0.5]]}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: res)
    commands.cmd_demo(_args("demo", "--out", str(tmp_path)))
    lines = capsys.readouterr().out.split("\n")
    assert lines[4] == "  eval:     EV   held-out R2: self 0.50, cross nan"
    assert len(lines) == 6


def test_fmt():
    assert commands._fmt(None) == "n/a" and commands._fmt(0.125) == "0.12"
    assert commands._fmt(-1.0) == "-1.00"


# ---- eval -------------------------------------------------------------------------------
class FakeReport:
    def __init__(self, summary, faithfulness=None, truth=None, universal=4):
        self.summary, self.faithfulness, self.truth = summary, faithfulness, truth
        self.concept_classes = {"universal": universal}


def test_eval_prints_r2_universal_concepts_and_jaccard(monkeypatch, capsys):
    from usae.analysis import evaluate

    seen = {}
    report = FakeReport({"self_r2_mean": 0.81234, "cross_r2_mean": 0.4, "jaccard_cross_mean":
                         0.256})
    monkeypatch.setattr(evaluate, "evaluate", lambda run, store, out, opts, **kw: seen.update(
        kw, opts=opts) or report)
    assert commands.cmd_eval(_args("eval", "R", "--store", "S", "--out", "E")) == 0
    assert capsys.readouterr().out == (
        "wrote E: report.json, concepts.csv, plots — R2 self 0.812, cross 0.400, 4 universal "
        "concepts, Jaccard of active sets across models 0.26\n")
    assert seen["independent"] is None and seen["compare"] is None and seen["force"] is False
    report.summary = {"self_r2_mean": 0.5, "cross_r2_mean": None}
    commands.cmd_eval(_args("eval", "R", "--store", "S", "--out", "E", "--no-plots"))
    assert capsys.readouterr().out == (
        "wrote E: report.json, concepts.csv — R2 self 0.500, cross n/a, 4 universal concepts, "
        "Jaccard of active sets across models n/a\n")


def test_eval_prints_faithfulness_with_each_compared_run_and_the_truth(monkeypatch, capsys,
                                                                       tmp_path):
    from usae.analysis import evaluate, faithfulness

    tables = {"mine": "  <mine>", "other": "  <other>"}
    monkeypatch.setattr(faithfulness, "format_table", lambda section: tables[section["id"]])
    out = tmp_path / "E"
    for name, section in (("b_run", {"id": "other"}), ("a_run", None)):
        (out / "compare" / name).mkdir(parents=True)
        (out / "compare" / name / "report.json").write_text(json.dumps(
            {"models": ["a"], "faithfulness": section}))
    truth = {"recovery": {"a": 0.91234, "b": 0.5}, "shared_as_one": 0.75,
             "partial_as_one": 0.5, "specific_detected": 1.0, "mcc_mean": 0.6666,
             "spurious": {"count": 3, "firing": 40}}
    report = FakeReport({"self_r2_mean": 1.0, "cross_r2_mean": 1.0}, {"id": "mine"}, truth)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: report)
    commands.cmd_eval(_args("eval", "R", "--store", "S", "--out", str(out)))
    lines = capsys.readouterr().out.split("\n")
    assert lines[1:] == [
        "  <mine>", "  compared run b_run:", "  <other>",
        "  against the truth: recovery (mean best cosine) a 0.912, b 0.500; shared as one "
        "concept 0.75, partly shared 0.50; model-specific detected 1.00; MCC 0.667; spurious 3 "
        "of 40 firing concepts", ""]


# ---- synth ------------------------------------------------------------------------------
def test_synth_says_what_it_wrote_and_what_to_run_next(monkeypatch, capsys):
    from usae.analysis import synth

    result = {"images": 100, "tokens": 4, "models": ["p", "q"], "dims": [8, 6],
              "n_features": 30, "features": {"shared": 20, "specific": 10}}
    seen = {}
    monkeypatch.setattr(synth, "synth", lambda out, options, force: seen.update(
        out=out, force=force) or result)
    assert commands.cmd_synth(_args("synth", "--out", "SY", "--force")) == 0
    assert seen == {"out": "SY", "force": True}
    assert capsys.readouterr().out == (
        "wrote SY: store/ (100 images x 4 tokens, models p (d=8), q (d=6)), truth with 30 "
        "features (shared 20, specific 10)\n"
        "  next: usae train --store SY/store --out RUN --preset fast, then usae eval RUN "
        "--store SY/store --out EVAL --truth SY\n")


# ---- explore, cam, concepts, push, serve ------------------------------------------------
def test_explore_says_where_the_site_is(monkeypatch, capsys):
    from usae.explorer import build

    monkeypatch.setattr(build, "build_explorer", lambda run, store, out, **kw: Path(out) /
                        "index.html")
    assert commands.cmd_explore(_args("explore", "R", "--store", "S", "--out", "X")) == 0
    assert capsys.readouterr().out == "wrote X/index.html: open it in a browser, or run: " \
                                      "usae serve X\n"


@pytest.mark.parametrize("text, ids", [(None, None), ("3", [3]), ("3, 5,,7", [3, 5, 7]),
                                       (" 12 ", [12]), ("", [])])
def test_concept_ids(text, ids):
    assert commands._concept_ids(text) == ids


def test_concept_ids_refuses_what_is_not_an_integer():
    with exactly("--concept takes integers K[,K...], got '3,x'"):
        commands._concept_ids("3,x")


def test_cam_needs_one_way_of_choosing_concepts_and_prints_each_score(monkeypatch, capsys):
    from usae.cam import maximize

    seen = {}
    doc = {"self_ratio": {"a": 1.234, "b": 0.5}, "transfer_offdiag_mean": 0.75,
           "control_concept": 9, "transfer_control_offdiag_mean": 0.125}
    monkeypatch.setattr(maximize, "run_cam", lambda run, store, concepts, top, out, options,
                        eval_dir: seen.update(concepts=concepts, top=top, out=out) or {4: doc})
    for argv in (["cam", "R", "--store", "S"],
                 ["cam", "R", "--store", "S", "--concept", "1", "--top", "2"]):
        with exactly("give either --concept K[,K...] or --top N"):
            commands.cmd_cam(_args(*argv))
    assert commands.cmd_cam(_args("cam", "R", "--store", "S", "--concept", "4,8")) == 0
    assert seen == {"concepts": [4, 8], "top": None, "out": None}
    assert capsys.readouterr().out == (
        "wrote R/cam/4/: self score a 1.23, b 0.50; transfer off-diagonal 0.75 "
        "(frequency-matched control concept 9: 0.12); robust scores: 0 = a typical natural "
        "image, 1 = the natural top 1 %\n")
    commands.cmd_cam(_args("cam", "R", "--store", "S", "--top", "1", "--out", "C"))
    assert seen["top"] == 1 and seen["concepts"] is None
    assert capsys.readouterr().out.startswith("wrote C/4/: ")


@pytest.fixture
def concepts_run(monkeypatch):
    from usae import hub
    from usae.analysis import concepts, eval_folder
    from usae.sae import run as run_folder

    seen = {}
    cfg = type("Cfg", (), {"sae": type("S", (), {"models": ("a", "b"), "n": 16})()})()
    monkeypatch.setattr(hub, "local_run", lambda ref: f"local:{ref}")
    monkeypatch.setattr(run_folder, "read_config", lambda run: seen.update(config_of=run) or cfg)
    monkeypatch.setattr(eval_folder, "check_eval_of_run", lambda ev, run, models, n:
                        seen.update(checked=(ev, run, models, n)))
    monkeypatch.setattr(concepts, "concept_table", lambda ev, ks, top, universal, store, images,
                        models: seen.update(table=(ev, ks, top, universal, store, images,
                                                   models)) or [{"concept": 1, "x": 0.5}])
    monkeypatch.setattr(concepts, "format_table", lambda table: f"<table of {len(table)}>")
    return seen


def test_concepts_checks_the_eval_against_the_run_then_prints(concepts_run, capsys):
    assert commands.cmd_concepts(_args("concepts", "R", "--eval", "E", "--concept", "1,2")) == 0
    assert concepts_run["checked"] == ("E", "local:R", ["a", "b"], 16)
    assert concepts_run["config_of"] == "local:R"
    assert concepts_run["table"] == ("E", [1, 2], 10, False, None, 3, ["a", "b"])
    assert capsys.readouterr().out == "<table of 1>\n"
    commands.cmd_concepts(_args("concepts", "R", "--eval", "E", "--json"))
    assert capsys.readouterr().out == '[\n  {\n    "concept": 1,\n    "x": 0.5\n  }\n]\n'


@pytest.mark.parametrize("flags", [["--top", "0"], ["--images", "-1"]])
def test_concepts_refuses_a_top_or_images_out_of_range(concepts_run, flags):
    with exactly("--top must be at least 1 and --images at least 0"):
        commands.cmd_concepts(_args("concepts", "R", "--eval", "E", *flags))
    assert "checked" not in concepts_run


def test_concepts_takes_the_edges_of_the_range(concepts_run):
    commands.cmd_concepts(_args("concepts", "R", "--eval", "E", "--top", "1", "--images", "0"))
    assert concepts_run["table"][2] == 1 and concepts_run["table"][5] == 0


def test_push_prints_the_plan(monkeypatch, capsys):
    from usae import hub

    seen = {}
    monkeypatch.setattr(hub, "push", lambda run, repo, ev, **kw: seen.update(kw) or {"p": 1})
    monkeypatch.setattr(hub, "describe_plan", lambda plan: f"plan {plan}")
    assert commands.cmd_push(_args("push", "R", "me/x", "--dry-run")) == 0
    assert capsys.readouterr().out == "plan {'p': 1}\n"
    assert seen == {"private": False, "dry_run": True, "force": False}


def test_serve_serves_the_folder_on_the_port(monkeypatch):
    from usae.explorer import serve

    seen = []
    monkeypatch.setattr(serve, "serve", lambda folder, port: seen.append((folder, port)))
    assert commands.cmd_serve(_args("serve", "X", "--port", "8123")) == 0
    assert seen == [("X", 8123)]


def test_import_reference_says_what_it_imported(monkeypatch, capsys):
    from usae.sae import reference

    sae = type("S", (), {"models": ("a", "b"), "cfg": type("C", (), {"n": 64, "k": 5})()})()
    monkeypatch.setattr(reference, "import_reference", lambda config, out: sae)
    assert commands.cmd_import_reference(_args("import-reference", "c.yaml", "--out", "R")) == 0
    assert capsys.readouterr().out == "wrote R: models ['a', 'b'], n=64, k=5\n"


def test_tables_meant_for_a_pipe_are_flushed_at_once(concepts_run, monkeypatch):
    """`usae concepts | head` and `usae store info | jq` see the output before the command
    ends (print's flush, recorded)."""
    from usae.store import store

    printed = []
    monkeypatch.setattr(commands, "print", lambda *a, **k: printed.append(k), raising=False)
    commands.cmd_concepts(_args("concepts", "R", "--eval", "E"))
    commands.cmd_concepts(_args("concepts", "R", "--eval", "E", "--json"))

    class FakeStore:
        def __init__(self, path):
            pass

        def info(self):
            return {}

    monkeypatch.setattr(store, "Store", FakeStore)
    commands.cmd_store(_args("store", "info", "S"))
    assert printed == [{"flush": True}] * 3
