"""The user-facing contract (shared/CONTRACT.md), through the real command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from usae.files import load_safetensors
from usae.store.writer import store_from_arrays

USAE = [sys.executable, "-m", "usae.cli"]
COMMANDS = ["demo", "cache", "store", "train", "import-reference", "encode", "decode", "eval",
            "explore", "serve"]


def run(*args, check=True):
    res = subprocess.run(USAE + [str(a) for a in args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(res.stderr)
    return res


def test_help_lists_every_command_and_documents_options():
    out = run("--help").stdout
    for c in COMMANDS:
        assert c in out
    for c in COMMANDS:
        assert "usage:" in run(c, "--help").stdout
    train_help = run("train", "--help").stdout
    for key in ("--preset", "--max-steps", "--resume", "--set", "--config"):
        assert key in train_help
    assert "import-npz" in run("store", "--help").stdout


def test_every_training_key_is_a_flag_with_its_default_and_reaches_the_config(tmp_path,
                                                                              capsys):
    import argparse
    import dataclasses
    import re

    from usae.cli import build_parser, main
    from usae.config import DATA_KEYS, SAEConfig, TrainConfig

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
                 if a[0] == "train")[1]
    help_text = " ".join(train.format_help().split())
    for cls in (SAEConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name in DATA_KEYS:
                continue
            flag = "--" + f.name.replace("_", "-")
            assert flag in help_text, flag
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            if f.name not in ("max_steps", "device"):  # (their own flags say what they do)
                assert re.search(re.escape(flag) + r".*?\[default: " + re.escape(str(shown)),
                                 help_text), flag
    for word in ("batchtopk", "matryoshka", "global TopK across models"):
        assert word in help_text
    # each flag lands in config.json as the key it names (an oracle: the dataclass field)
    acts = np.random.default_rng(0).standard_normal((16, 2, 6))
    store = store_from_arrays(tmp_path / "s", {"a": acts}, dtype="float32",
                              splits=["train"] * 16).path
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "r"), "--lr", "0.002",
                 "--k", "3", "--n-concepts", "24", "--batch-images", "4", "--matryoshka",
                 "6,12", "--sparsity", "batchtopk", "--no-keep-freed-memory", "--max-steps",
                 "2", "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["train"]["lr"], cfg["sae"]["k"], cfg["sae"]["n_concepts"]) == (0.002, 3, 24)
    assert cfg["train"]["matryoshka"] == [6, 12] and cfg["sae"]["sparsity"] == "batchtopk"
    assert cfg["train"]["batch_images"] == 4 and cfg["train"]["keep_freed_memory"] is False
    # --set is an alias; the same key given both ways must agree
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "q"), "--set", "k=3",
                 "--k", "4", "--max-steps", "2"]) == 2
    assert "given twice" in capsys.readouterr().err
    # the same value spelled two ways is one value
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "p"), "--set",
                 "lr=2e-3", "--lr", "0.002", "--k", "3", "--n-concepts", "24", "--batch-images",
                 "4", "--max-steps",
                 "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["train"]["lr"] == 0.002
    # image options belong to --images
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "q"), "--keep-cls",
                 "--max-steps", "2"]) == 2
    assert "--keep-cls: image options apply with --images" in capsys.readouterr().err
    assert isinstance(train, argparse.ArgumentParser)


def test_errors_are_one_clear_line(tmp_path):
    res = run("store", "info", tmp_path, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is not a usae store" in res.stderr
    res = run("encode", tmp_path, "--model", "a", "--input", "x.npy", "--out", "z.npy",
              check=False)
    assert res.returncode == 2 and "not a usae run" in res.stderr


def test_store_train_encode_decode_eval_explore(arrays, tmp_path):
    store_from_arrays(tmp_path / "store", arrays)
    info = json.loads(run("store", "info", tmp_path / "store").stdout)
    assert set(info) >= {"models", "n_images", "splits"}
    assert info["models"]["m1"] == {"d": 8, "tokens": 4}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sae": {"n_concepts": 32, "k": 3}, "train": {"log_every": 2}}))
    run("train", "--store", tmp_path / "store", "--out", tmp_path / "run", "--config", cfg,
        "--set", "batch_images=4", "--max-steps", "10", "--no-progress")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "model.safetensors"} <= files
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and {"step", "loss", "tokens", "elapsed_s"} <= set(rows[-1])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["sae"]["n_concepts"] == 32 and saved["train"]["log_every"] == 2

    x = arrays["m0"].reshape(-1, 12)[:10]
    np.save(tmp_path / "x.npy", x)
    run("encode", tmp_path / "run", "--model", "m0", "--input", tmp_path / "x.npy", "--out",
        tmp_path / "z.npy")
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (10, 32) and z.dtype == np.float32 and ((z > 0).sum(1) <= 3).all()
    run("decode", tmp_path / "run", "--model", "m2", "--codes", tmp_path / "z.npy", "--out",
        tmp_path / "x2.npy")
    # decode = z @ unit-row dictionary, then the run's un-standardization, written out here
    w = load_safetensors(tmp_path / "run" / "model.safetensors")
    d = w["dictionaries.m2"].double().numpy()
    want = z @ (d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-8))
    want = want * w["scale_m2"].double().numpy() + w["mean_m2"].double().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "x2.npy"), want, rtol=1e-4, atol=1e-4)
    bad = run("encode", tmp_path / "run", "--model", "m1", "--input", tmp_path / "x.npy",
              "--out", tmp_path / "bad.npy", check=False)
    assert bad.returncode == 2 and "m1" in bad.stderr and "(N, 8)" in bad.stderr

    run("eval", tmp_path / "run", "--store", tmp_path / "store", "--out", tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for key in ("models", "r2", "r2_paper", "l0", "dead_fraction", "n_tokens", "threshold"):
        assert key in report
    assert report["threshold"] == 0.1 and np.asarray(report["r2"]).shape == (3, 3)
    assert list((tmp_path / "eval").glob("*.png"))
    run("eval", tmp_path / "run", "--store", tmp_path / "store", "--out", tmp_path / "eval_all",
        "--split", "all", "--no-plots")
    assert json.loads((tmp_path / "eval_all" / "report.json").read_text())["n_tokens"] == 48 * 4

    run("explore", tmp_path / "run", "--store", tmp_path / "store", "--out", tmp_path / "site")
    assert (tmp_path / "site" / "index.html").exists()


@pytest.mark.slow
def test_demo_quick_writes_every_contract_output(quick_demo):
    for rel in ("store/manifest.json", "run/model.safetensors", "run/config.json",
                "run/metrics.jsonl", "eval/report.json", "explorer/index.html"):
        assert (quick_demo / rel).exists(), rel
    stdout = (quick_demo.parent / "stdout.txt").read_text()
    assert "explorer" in stdout and "held-out R2" in stdout
    info = json.loads(run("store", "info", quick_demo / "store").stdout)
    assert set(info["models"]) == {"effnet_lite0", "effnet_lite1", "effnet_lite2"}
    assert info["models"]["effnet_lite2"] == {"d": 352, "tokens": 49}


def test_resume_keeps_the_runs_own_config_and_preset(arrays, tmp_path):
    store_from_arrays(tmp_path / "store", arrays)
    common = ["--store", tmp_path / "store", "--out", tmp_path / "run", "--no-progress"]
    run("train", *common, "--preset", "demo", "--set", "batch_images=4", "--set",
        "n_concepts=32", "--set", "k=3", "--max-steps", "6")
    run("train", *common, "--resume")  # no keys given again: the saved config is used
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["preset"] == "demo" and saved["train"]["lr"] == 3e-3
    bad = run("train", *common, "--resume", "--set", "lr=1", check=False)
    assert bad.returncode == 2 and "different config" in bad.stderr


def test_every_help_shows_every_default():
    """Each option whose default is a value shows it in its command's --help."""
    import argparse

    from usae.cli import build_parser

    parser = build_parser()

    def walk(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)
        yield p

    checked = 0
    for p in walk(parser):
        text = p.format_help()
        for action in p._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS) \
                    or action.default is False or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            block = text[text.index("\n  " + flag):]
            assert "default" in block[:400], (p.prog, flag)
            checked += 1
    assert checked > 30


def test_entry_ends_at_once_after_a_lost_peer(monkeypatch):
    """Guards the exit after a lost torchrun peer: gloo's threads still wait on it and the
    interpreter's teardown would abort (SIGABRT) instead of returning the error's status, so
    the process ends with os._exit(status); otherwise it exits normally."""
    import usae.cli as cli
    import usae.distributed as distributed

    class Ended(Exception):
        pass

    def fake_exit(code):
        raise Ended(code)

    monkeypatch.setattr(cli, "main", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as normal:
        cli.entry()
    assert normal.value.code == 2
    monkeypatch.setattr(distributed, "_PEER_LOST", True)
    with pytest.raises(Ended) as ended:
        cli.entry()
    assert ended.value.args == (2,)


class _Reached(Exception):
    """Raised by a stand-in library function once it has seen its arguments."""


def _other_value(f, hint):
    """A valid value of option field ``f`` other than its default (an oracle: the field's own
    type, choices and limits), or None where no such value can be given on this machine."""
    meta, d = f.metadata, f.default
    if f.name == "device":
        return None  # cuda is refused without a GPU
    if hint is bool:
        return not d
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != d)
    if hint is str:
        return {"split": "train", "dims": "8,9", "shard_dir": "shards"}[f.name]
    step = 1 if hint is int else 0.25
    for v in (d + step, d - step, d / 2):
        v = hint(v)
        if v != d and (meta.get("min") is None or v >= meta["min"]) and \
                (meta.get("max") is None or v <= meta["max"]) and \
                (meta.get("below") is None or v < meta["below"]):
            return v
    raise AssertionError(f"no other value for {f.name}")


def _flags(cls, skip=()):
    """argv giving every option of ``cls`` (but ``skip``) a value other than its default, and
    the values expected in the options object the library receives."""
    import dataclasses
    import typing

    hints, argv, want = typing.get_type_hints(cls), [], {}
    for f in dataclasses.fields(cls):
        value = None if f.name in skip else _other_value(f, hints[f.name])
        if value is None:
            continue
        dashed = f.name.replace("_", "-")
        if hints[f.name] is bool:
            argv.append(f"--{dashed}" if value else f"--no-{dashed}")
        else:
            argv += [f"--{dashed}", str(value)]
        want[f.name] = value
    return argv, want


@pytest.mark.parametrize("command", ["cache", "store add-model", "train --images", "eval",
                                     "explore", "cam", "synth"])
def test_every_option_flag_reaches_the_library_as_the_field_it_names(command, monkeypatch,
                                                                     tmp_path):
    import importlib

    from usae.analysis.synth import SynthOptions
    from usae.cli import main
    from usae.options import (
        STORE_KEEPS,
        CacheOptions,
        CamOptions,
        EvalOptions,
        ExploreOptions,
        StreamOptions,
    )

    t = str(tmp_path)
    table = {  # command -> (options class, library function, argv before the options, skip)
        "cache": (CacheOptions, "usae.data.cache:cache",
                  ["cache", "--images", t, "--models", "m", "--out", t + "/o"], ()),
        "store add-model": (CacheOptions, "usae.data.store_add:add_models",
                            ["store", "add-model", t, "--models", "m"], STORE_KEEPS),
        "train --images": (StreamOptions, "usae.data.streaming:train_from_images",
                           ["train", "--images", t, "--models", "m", "--out", t + "/o"], ()),
        "eval": (EvalOptions, "usae.analysis.evaluate:evaluate",
                 ["eval", t + "/run", "--store", t, "--out", t + "/o"], ()),
        "explore": (ExploreOptions, "usae.explorer.build:build_explorer",
                    ["explore", t + "/run", "--store", t, "--out", t + "/o"], ()),
        "cam": (CamOptions, "usae.cam.maximize:run_cam",
                ["cam", t + "/run", "--store", t, "--concept", "1", "--out", t + "/o"], ()),
        "synth": (SynthOptions, "usae.analysis.synth:synth", ["synth", "--out", t + "/o"], ()),
    }
    cls, target, argv, skip = table[command]
    module, name = target.split(":")
    seen = []

    def stand_in(*args, **kwargs):
        seen.extend([*args, *kwargs.values()])
        raise _Reached

    monkeypatch.setattr(importlib.import_module(module), name, stand_in)
    flags, want = _flags(cls, skip)
    assert len(want) >= 2, "the test gives this command's options"
    with pytest.raises(_Reached):
        main([*argv, *flags])
    options = next(a for a in seen if isinstance(a, cls))
    for key, value in want.items():
        assert getattr(options, key) == value, (command, key)


# command line -> (library function, the arguments it must receive, by the function's own
# parameter names); every other argument of the call is checked to keep its default
WIRING = [
    (["cache", "--images", "I", "--models", "M", "--out", "O"], "usae.data.cache:cache",
     {"models": "M", "images": "I", "out": "O"}),
    (["store", "add-model", "S", "--models", "M", "--no-progress"],
     "usae.data.store_add:add_models", {"store_path": "S", "models": "M", "progress": False}),
    (["store", "add-model", "S", "--models", "M"], "usae.data.store_add:add_models",
     {"store_path": "S", "models": "M", "progress": True}),
    (["store", "merge", "A", "B", "--out", "O", "--force"], "usae.store.merge:merge_shards",
     {"shards": ["A", "B"], "out": "O", "force": True}),
    (["store", "import-npz", "SRC", "--out", "O", "--models", "a, b,", "--split", "val",
      "--dtype", "float32"], "usae.store.npz_import:import_npz",
     {"src": "SRC", "out": "O", "models": ["a", "b"], "split": "val", "dtype": "float32"}),
    (["train", "--store", "S", "--out", "O", "--preset", "fast", "--config", "C.json", "--set",
      "lr=0.1", "--set", "k=3", "--max-steps", "7", "--device", "cpu", "--resume", "--force",
      "--split", "val", "--no-progress", "--independent", "--n-concepts", "9"],
     "usae.sae.training:train_from_store",
     {"store_path": "S", "out": "O", "preset": "fast", "config_file": "C.json",
      # (--max-steps and --device are training keys too: they reach the config both ways)
      "sets": ["lr=0.1", "k=3"], "keys": {"n_concepts": 9, "max_steps": 7, "device": "cpu"},
      "max_steps": 7, "device": "cpu",
      "resume": True, "force": True, "split": "val", "independent": True, "progress": False}),
    (["train", "--store", "S", "--out", "O"], "usae.sae.training:train_from_store",
     {"store_path": "S", "out": "O", "preset": None, "config_file": None, "sets": [],
      "keys": {}, "max_steps": None, "device": None, "resume": False, "force": False,
      "split": "train", "independent": False, "progress": True}),
    (["train", "--images", "I", "--models", "M", "--out", "O", "--resume"],
     "usae.data.streaming:train_from_images",
     {"images": "I", "models": "M", "out": "O", "resume": True, "progress": True}),
    (["train", "--extend", "R", "--store", "S", "--out", "O", "--finetune", "--force"],
     "usae.sae.extend:extend_run",
     {"run": "R", "store_path": "S", "out": "O", "finetune": True, "force": True}),
    (["train", "--extend", "R", "--store", "S", "--out", "O"], "usae.sae.extend:extend_run",
     {"run": "R", "store_path": "S", "out": "O", "finetune": False, "force": False}),
    (["eval", "R", "--store", "S", "--out", "O", "--independent", "IND", "--compare", "C1",
      "C2", "--force", "--truth", "T"], "usae.analysis.evaluate:evaluate",
     {"run": "R", "store_path": "S", "out": "O", "independent": "IND", "compare": ["C1", "C2"],
      "force": True, "truth": "T"}),
    (["eval", "R", "--store", "S", "--out", "O"], "usae.analysis.evaluate:evaluate",
     {"run": "R", "store_path": "S", "out": "O", "independent": None, "compare": None,
      "force": False, "truth": None}),
    (["synth", "--out", "O", "--force"], "usae.analysis.synth:synth",
     {"out": "O", "force": True}),
    (["explore", "R", "--store", "S", "--out", "O", "--eval", "E", "--force"],
     "usae.explorer.build:build_explorer",
     {"run": "R", "store_path": "S", "out": "O", "eval_dir": "E", "force": True}),
    (["explore", "R", "--store", "S", "--out", "O"], "usae.explorer.build:build_explorer",
     {"run": "R", "store_path": "S", "out": "O", "eval_dir": None, "force": False}),
    (["cam", "R", "--store", "S", "--concept", "3, 5", "--out", "O", "--eval", "E"],
     "usae.cam.maximize:run_cam",
     {"run": "R", "store_path": "S", "concepts": [3, 5], "top": None, "out": "O",
      "eval_dir": "E"}),
    (["cam", "R", "--store", "S", "--top", "4"], "usae.cam.maximize:run_cam",
     {"run": "R", "store_path": "S", "concepts": None, "top": 4, "out": None,
      "eval_dir": None}),
    (["push", "R", "me/x", "--eval", "E", "--private", "--dry-run", "--force"],
     "usae.hub:push", {"run": "R", "repo_id": "me/x", "eval_dir": "E", "private": True,
                       "dry_run": True, "force": True}),
    (["push", "R", "me/x"], "usae.hub:push", {"run": "R", "repo_id": "me/x", "eval_dir": None,
                                             "private": False, "dry_run": False,
                                             "force": False}),
    (["serve", "D", "--port", "0"], "usae.explorer.serve:serve", {"directory": "D", "port": 0}),
    (["import-reference", "C.yaml", "--out", "O"], "usae.sae.reference:import_reference",
     {"yaml_path": "C.yaml", "out_dir": "O"}),
    (["demo", "--out", "O", "--images", "9", "--steps", "3", "--models", "M", "--quick"],
     "usae.demo:run_demo",
     {"out": "O", "n_images": 9, "steps": 3, "models": "M", "quick": True}),
    (["demo"], "usae.demo:run_demo",
     {"out": "demo-output", "n_images": 320, "steps": 0, "models": "demo", "quick": False}),
    (["encode", "R", "--model", "m", "--input", "X", "--out", "O"],
     "usae.sae.model:UniversalSAE.load", {"run_dir": "R", "device": "cpu"}),
    (["concepts", "R", "--eval", "E", "--store", "S", "--concept", "1,2", "--top", "4",
      "--universal", "--images", "0"], "usae.analysis.concepts:concept_table",
     {"eval_dir": "E", "concepts": [1, 2], "top": 4, "universal_only": True, "store": "S",
      "images": 0, "models": ["a", "b"]}),
    (["concepts", "R", "--eval", "E"], "usae.analysis.concepts:concept_table",
     {"eval_dir": "E", "concepts": None, "top": 10, "universal_only": False, "store": None,
      "images": 3, "models": ["a", "b"]}),
]


@pytest.mark.parametrize("argv, target, want", WIRING, ids=[" ".join(w[0][:2]) + f" #{i}"
                                                           for i, w in enumerate(WIRING)])
def test_every_argument_reaches_the_library_parameter_it_names(argv, target, want, monkeypatch,
                                                               tmp_path):
    """The call each command makes, bound to the real function's signature (an oracle outside
    the CLI: the library's own parameter names), holds each argument where it belongs."""
    import importlib
    import inspect

    from usae.cli import main
    from usae.config import resolve

    monkeypatch.chdir(tmp_path)  # (output folders are locked where they would be written)
    module_name, _, attr = target.partition(":")
    owner = importlib.import_module(module_name)
    cls_name, _, method = attr.rpartition(".")
    holder = getattr(owner, cls_name) if cls_name else owner
    real = getattr(holder, method)
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        raise _Reached

    monkeypatch.setattr(holder, method, staticmethod(stand_in) if cls_name else stand_in)
    if argv[0] == "concepts":  # the run and its eval, as the command reads them first
        import usae.analysis.eval_folder as eval_folder
        import usae.sae.run as run_folder

        monkeypatch.setattr(run_folder, "read_config",
                            lambda run: resolve(("a", "b"), (4, 4), "paper"))
        monkeypatch.setattr(eval_folder, "check_eval_of_run", lambda *a, **k: None)
    with pytest.raises(_Reached):
        main(argv)
    (bound,) = calls
    got = {name: bound.get(name, inspect.signature(real).parameters[name].default)
           for name in want}
    assert got == want
