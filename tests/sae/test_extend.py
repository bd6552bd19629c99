"""`usae train --extend RUN`: a trained run gains a store's new model; its own weights stay
bit-identical, and the extended run is a run like any other (eval, card, resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import prebuilt
from tests.data.test_cache import make_images
from usae.cli import main
from usae.data.cache import cache
from usae.data.store_add import add_models
from usae.errors import UsaeError
from usae.sae.extend import extend_run

SPECS = "effnet:lite0?img_size=64&name=a,effnet:lite1?img_size=64&name=b"
NEW = "effnet:lite2?img_size=64&name=c"
KEYS = ["--n-concepts", "64", "--k", "4", "--batch-images", "2", "--log-every", "1",
        "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run on models a and b, and its store with model c added."""
    root = tmp_path_factory.mktemp("extend")

    def build(dest):
        images = make_images(dest / "imgs", n=10, bad=False)
        cache(SPECS, images, dest / "store", batch_size=5, workers=0, progress=False)
        assert main(["train", "--store", str(dest / "store"), "--out", str(dest / "run"),
                     "--preset", "fast", *KEYS, "--max-steps", "8", "--no-progress"]) == 0
        add_models(dest / "store", NEW, batch_size=5, workers=0, progress=False)

    prebuilt("extend-setup", root, build)  # (no extend code runs here)
    return root


def test_the_runs_own_weights_are_bit_identical_and_the_new_model_trains(setup, tmp_path):
    out = tmp_path / "run2"
    assert main(["train", "--extend", str(setup / "run"), "--store", str(setup / "store"),
                 "--out", str(out), "--max-steps", "6", "--no-progress"]) == 0
    old, new = load_file(setup / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    for key, value in old.items():
        assert torch.equal(new[key], value), key
    added = {k: v for k, v in new.items() if k not in old}
    assert {"encoders.c.linear.weight", "dictionaries.c", "mean_c", "scale_c"} <= set(added)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sae"]["models"] == ["a", "b", "c"]
    assert cfg["train"]["frozen_models"] == ["a", "b"] and cfg["preset"] == "fast"
    assert cfg["extended_from"]["added"] == ["c"] and cfg["status"]["state"] == "final"
    # the new dictionary and encoder moved from their initialization; the old ones did not
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["recon"]["c"] > 0 for r in rows)
    from usae.hub import model_card

    card = model_card(out)
    assert "extended from" in card and "added `c`" in card
    # with the code-matching loss, through the CLI flag (the old weights stay put)
    assert main(["train", "--extend", str(setup / "run"), "--store", str(setup / "store"),
                 "--out", str(tmp_path / "matched"), "--max-steps", "3", "--match-coef",
                 "0.5", "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "matched" / "config.json").read_text())
    assert cfg["train"]["match_coef"] == 0.5
    matched = load_file(tmp_path / "matched" / "model.safetensors")
    assert all(torch.equal(matched[k], v) for k, v in old.items())


def test_an_extended_run_evaluates_like_any_run(setup, tmp_path):
    from usae.analysis.evaluate import evaluate

    out = tmp_path / "run2"
    extend_run(setup / "run", setup / "store", out, max_steps=4, progress=False)
    report = evaluate(out, setup / "store", tmp_path / "eval", split="all", plots=False,
                      faithfulness=False, progress=False)
    assert report["models"] == ["a", "b", "c"] and len(report["r2"]) == 3


def test_refusals_are_one_line(setup, tmp_path, capsys):
    other = tmp_path / "other"
    cache(f"{SPECS},{NEW}", make_images(tmp_path / "imgs", n=6, bad=False), other,
          batch_size=3, workers=0, progress=False)
    with pytest.raises(UsaeError, match="images differ from those the run was trained on"):
        extend_run(setup / "run", other, tmp_path / "x", max_steps=2, progress=False)
    assert main(["train", "--store", str(setup / "store"), "--out", str(tmp_path / "full"),
                 "--preset", "fast", *KEYS, "--max-steps", "2", "--no-progress"]) == 0
    with pytest.raises(UsaeError, match="has no model the run lacks"):
        extend_run(tmp_path / "full", setup / "store", tmp_path / "y", max_steps=2,
                   progress=False)
    assert main(["train", "--extend", str(setup / "run"), "--images", "x", "--models", "y",
                 "--out", str(tmp_path / "z")]) == 2
    assert "--extend needs --store" in capsys.readouterr().err
    assert main(["train", "--extend", str(setup / "run"), "--store", str(setup / "store"),
                 "--keep-cls", "--out", str(tmp_path / "z")]) == 2
    assert "--keep-cls: image options apply with --images" in capsys.readouterr().err


def test_kill_9_during_extend_then_resume_ends_where_the_whole_run_ends(setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out, *more):
        return [sys.executable, "-m", "usae", "train", "--extend", str(setup / "run"),
                "--store", str(setup / "store"), "--out", str(out), "--max-steps", "40",
                "--checkpoint-every", "4", "--no-progress", *more]

    assert subprocess.run(command(tmp_path / "whole"), env=env, timeout=300).returncode == 0
    proc = subprocess.Popen(command(tmp_path / "part"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ckpt = tmp_path / "part" / "checkpoint.safetensors"
    for _ in range(3000):
        if ckpt.exists() or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    res = subprocess.run(command(tmp_path / "part", "--resume"), env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_finetune_trains_every_model_and_says_how_far_the_concepts_moved(setup, tmp_path):
    ext, ft = tmp_path / "ext", tmp_path / "ft"
    extend_run(setup / "run", setup / "store", ext, max_steps=4, progress=False)
    assert main(["train", "--extend", str(ext), "--finetune", "--store", str(setup / "store"),
                 "--out", str(ft), "--max-steps", "4", "--no-progress"]) == 0
    assert json.loads((ft / "config.json").read_text())["train"]["frozen_models"] == []
    before, after = load_file(ext / "model.safetensors"), load_file(ft / "model.safetensors")
    drift = json.loads((ft / "concept_drift.json").read_text())["models"]
    for m in ("a", "b", "c"):
        assert not torch.equal(before[f"dictionaries.{m}"], after[f"dictionaries.{m}"])

        def unit(w):
            return w / (w.norm(dim=1, keepdim=True) + 1e-8)

        cos = (unit(before[f"dictionaries.{m}"]) * unit(after[f"dictionaries.{m}"])).sum(1)
        assert drift[m]["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-4)
        assert drift[m]["moved_fraction"] == pytest.approx(float((cos < 0.9).float().mean()),
                                                           abs=1e-4)
    (ft / "concept_drift.json").unlink()  # a resumed fine-tuning writes it when it ends
    summary = extend_run(ext, setup / "store", ft, finetune=True, resume=True, max_steps=4,
                         progress=False)
    assert json.loads((ft / "concept_drift.json").read_text())["models"] == drift
    assert summary["concept_drift"] == drift
    with pytest.raises(UsaeError, match="extend the run with them first"):
        extend_run(setup / "run", setup / "store", tmp_path / "x", finetune=True,
                   max_steps=2, progress=False)
    assert main(["train", "--store", str(setup / "store"), "--out", str(tmp_path / "y"),
                 "--finetune"]) == 2


def test_two_ranks_extend_as_one_process_and_add_a_model_as_one(setup, tmp_path):
    """torchrun: `--extend` on two ranks trains the run one process trains (the frozen
    weights bit-identical on both), and `store add-model` on two ranks writes the bytes one
    process writes (every process with one thread)."""
    import shutil

    from tests.sae.test_distributed import TORCHRUN, _env, assert_same_run, free_port

    def torchrun(*args):
        return subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(free_port()), "-m", "usae",
                               *args], capture_output=True, text=True, timeout=300,
                              env=_env())

    common = ["--extend", str(setup / "run"), "--store", str(setup / "store"), "--max-steps",
              "6", "--log-every", "1", "--no-progress"]
    res = torchrun("train", *common, "--out", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "usae", "train", *common, "--out",
                          str(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=6)
    old = load_file(setup / "run" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(two[k], v) for k, v in old.items())
    for name in ("s1", "s2"):
        shutil.copytree(setup / "store", tmp_path / name)
        for path in (tmp_path / name).glob("acts_c.bin"):
            path.unlink()
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        manifest["models"].pop("c")
        manifest["stats"].pop("c")
        manifest["content_hash"] = manifest["history"][0]["previous_content_hash"]
        manifest.pop("history")
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    add = ["store", "add-model", "--models", NEW, "--workers", "0", "--batch-size", "2",
           "--no-progress"]
    res = torchrun(*add[:2], str(tmp_path / "s2"), *add[2:])
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "usae", *add[:2], str(tmp_path / "s1"),
                          *add[2:]], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("acts_c.bin", "manifest.json"):
        a, b = (tmp_path / "s1" / name).read_bytes(), (tmp_path / "s2" / name).read_bytes()
        if name == "manifest.json":  # (the time of the join differs; float64 statistics
            a, b = (json.loads(x) for x in (a, b))  # summed over two ranks round otherwise)
            for m in (a, b):
                m["history"][0].pop("at")
            stats = a.pop("stats"), b.pop("stats")
            assert stats[0]["a"] == stats[1]["a"] and stats[0]["b"] == stats[1]["b"]
            for key, value in stats[0]["c"].items():
                assert np.allclose(value, stats[1]["c"][key], rtol=1e-12, atol=0), key
        assert a == b, name


@pytest.mark.slow
def test_a_shared_run_and_a_run_without_a_store_record_extend(setup, tmp_path, caplog):
    """An hf:// run (from a stand-in Hub on 127.0.0.1) extends like a local one; a run that
    does not record its store (import-reference's) extends with a warning that its images
    cannot be checked."""
    from tests.conftest import stand_in_hub

    with stand_in_hub(setup / "run", "me/run", tmp_path) as env:
        res = subprocess.run([sys.executable, "-m", "usae", "train", "--extend", "hf://me/run",
                              "--store", str(setup / "store"), "--out", str(tmp_path / "x"),
                              "--max-steps", "2", "--no-progress"],
                             env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    old = load_file(setup / "run" / "model.safetensors")
    new = load_file(tmp_path / "x" / "model.safetensors")
    assert all(torch.equal(new[k], v) for k, v in old.items())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((setup / "run" / "model.safetensors").read_bytes())
    cfg = json.loads((setup / "run" / "config.json").read_text())
    cfg.pop("store")
    (bare / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        extend_run(bare, setup / "store", tmp_path / "y", max_steps=2, progress=False)
    assert "does not record its store" in caplog.text
