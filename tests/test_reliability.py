"""Reliability: each failure a new user hit (issue 'Reliability'), reproduced and pinned.

Fault injection: ``FaultyDisk`` makes the k-th filesystem write of a run fail with ENOSPC
(in process) or kills the process there (in a subprocess); after each, a re-run with space
completes and equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usae.cli import main
from usae.config import resolve
from usae.data.images import load_rgb
from usae.data.sources import ArraySource
from usae.errors import UsaeError
from usae.files import load_safetensors
from usae.sae.run import run_status
from usae.sae.training import train_run
from usae.store.store import Store
from usae.store.writer import store_from_arrays


class FaultyDisk:
    """Counts the writes that make up a run's durable state (``os.replace`` of atomic
    writes, ``os.pwrite`` of store rows, ``os.posix_fallocate``) and fails the k-th."""

    def __init__(self, monkeypatch, fail_at: int) -> None:
        self.count, self.fail_at = 0, fail_at
        for name in ("replace", "pwrite", "posix_fallocate"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def faulty(*args, **kwargs):
            self.count += 1
            if self.count == self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return faulty


def _train(arrays, out, resume=False, force=False, steps=12):
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "paper",
                  {"n_concepts": 16, "k": 3, "batch_images": 8, "max_steps": steps,
                   "checkpoint_every": 4, "log_every": 2})
    return train_run(cfg, ArraySource(arrays), out, resume=resume, force=force, progress=False)


def _weights(run):
    return load_safetensors(Path(run) / "model.safetensors")


@pytest.mark.slow
def test_disk_full_at_every_write_of_train_then_resume_equals_uninterrupted(arrays, tmp_path,
                                                                           monkeypatch):
    """Every write point of a small training run: ENOSPC there gives a clear UsaeError, never a
    false success, and the re-run (resume when a checkpoint landed) ends bit-identical."""
    _train(arrays, tmp_path / "ref")
    ref = _weights(tmp_path / "ref")
    k = 1
    while True:
        out = tmp_path / f"k{k}"
        with monkeypatch.context() as mp:
            disk = FaultyDisk(mp, k)
            try:
                _train(arrays, out)
                failed = False
            except UsaeError as err:
                failed = True
                assert "space" in str(err) and "re-run" in str(err)
        if not failed:
            assert disk.count < k  # every write point has been tried
            break
        resume = (out / "checkpoint.safetensors").exists()
        _train(arrays, out, resume=resume, force=not resume)
        got = _weights(out)
        assert run_status(out)["state"] == "final"
        for key in ref:
            assert torch.equal(got[key], ref[key]), (k, key)
        k += 1
    assert k > 8


@pytest.mark.slow
def test_killed_at_every_write_of_cache_then_rerun_is_bit_identical(tmp_path):
    """A subprocess caches 4 images (2 per batch) and is killed (os._exit) at its k-th write;
    re-running the same command finishes a store equal to an uninterrupted one."""
    imgs = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(4):
        imgs.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    script = textwrap.dedent("""
        import os, sys
        k = int(sys.argv[1]); count = [0]
        def wrap(real):
            def f(*a, **kw):
                count[0] += 1
                if count[0] == k:
                    os._exit(9)
                return real(*a, **kw)
            return f
        for name in ("replace", "pwrite", "posix_fallocate"):
            setattr(os, name, wrap(getattr(os, name)))
        from usae.cli import main
        sys.exit(main(sys.argv[2:]))
    """)
    spec = "effnet:lite0?pretrained=0&img_size=32&name=a"

    def run(k, out):
        return subprocess.run([sys.executable, "-c", script, str(k), "cache", "--models", spec,
                               "--images", str(imgs), "--out", str(out), "--batch-size", "2",
                               "--workers", "0"], capture_output=True, text=True, timeout=120)

    assert run(0, tmp_path / "ref").returncode == 0
    ref = Store(tmp_path / "ref")
    for k in range(1, 40):
        out = tmp_path / f"k{k}"
        first = run(k, out)
        if first.returncode == 0:
            break
        again = run(0, out)
        assert again.returncode == 0, again.stderr
        got = Store(out)
        assert got.manifest["content_hash"] == ref.manifest["content_hash"]
        assert np.array_equal(np.asarray(got.array("a")), np.asarray(ref.array("a")))
    assert k > 5


def test_store_stopped_between_manifest_and_first_progress_resumes(arrays, tmp_path,
                                                                   monkeypatch):
    """Item 1: a failure right after the manifest left a store every re-run rejected."""
    with monkeypatch.context() as mp:
        FaultyDisk(mp, 2)  # 1: manifest, 2: the first array's reservation
        with pytest.raises(UsaeError, match="free some space"):
            store_from_arrays(tmp_path / "s", arrays)
    store = store_from_arrays(tmp_path / "s", arrays)
    assert store.verify() and store.info()["n_images"] == 48


def test_false_success_is_gone_and_resume_needs_the_checkpoint(arrays, tmp_path, monkeypatch,
                                                                capsys):
    """Item 2: a failed final save must not print 'wrote ...' nor exit 0."""
    store_from_arrays(tmp_path / "store", arrays)
    argv = ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"),
            "--max-steps", "4", "--set", "n_concepts=16", "--set", "k=2", "--set",
            "batch_images=8", "--no-progress"]
    with monkeypatch.context() as mp:
        disk = FaultyDisk(mp, 10 ** 9)
        assert main(argv) == 0
        writes = disk.count
    capsys.readouterr()
    with monkeypatch.context() as mp:
        FaultyDisk(mp, writes)  # the very last write: config.json with the final status
        assert main(argv + ["--force"]) == 2
    out = capsys.readouterr()
    assert "wrote" not in out.out and "space" in out.err
    assert main(argv + ["--resume"]) == 0
    assert run_status(tmp_path / "run")["state"] == "final"


def test_sixteen_bit_png_keeps_its_content(tmp_path):
    """Item 3: mode I;16 (a photo x 257) was stored all white."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (12, 10)).astype(np.uint16)
    Image.fromarray(photo * 257).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "a.png"))
    np.testing.assert_array_equal(rgb[..., 0], photo)


@pytest.mark.parametrize("mode, values, want", [
    ("I;16", np.array([[0, 65535], [257, 25700]]), [[0, 255], [1, 100]]),
    ("I", np.array([[0, 1 << 20], [1 << 19, 1 << 18]]), [[0, 255], [128, 64]]),
    ("F", np.array([[0.0, 1.0], [0.5, 0.25]]), [[0, 255], [128, 64]]),
    ("F", np.array([[-1.0, 3.0], [1.0, 0.0]]), [[0, 255], [128, 64]]),
])
def test_high_bit_depth_modes_are_rescaled_not_clipped(tmp_path, mode, values, want):
    im = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert im.mode == mode
    im.save(tmp_path / "x.tiff")
    got = np.asarray(load_rgb(tmp_path / "x.tiff"))[..., 1]
    np.testing.assert_allclose(got, want, atol=1)


def test_finished_run_and_foreign_folders_need_force(arrays, tmp_path):
    """Item 4: `train --out RUN` silently replaced a finished run."""
    _train(arrays, tmp_path / "run")
    with pytest.raises(UsaeError, match="--resume to continue it, --force to replace it"):
        _train(arrays, tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsaeError, match="not empty"):
        _train(arrays, tmp_path / "other")
    _train(arrays, tmp_path / "run", force=True)


def test_eval_and_explore_refuse_foreign_folders_and_replace_their_own(arrays, tmp_path):
    from usae.analysis.evaluate import evaluate

    store = store_from_arrays(tmp_path / "store", arrays)
    cfg = resolve(store.models, store.dims, "paper", {"n_concepts": 16, "k": 2,
                                                      "batch_images": 8, "max_steps": 3})
    from usae.data.sources import StoreSource

    train_run(cfg, StoreSource(store, "train"), tmp_path / "run", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(UsaeError, match="--force"):
        evaluate(tmp_path / "run", tmp_path / "store", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"
    evaluate(tmp_path / "run", tmp_path / "store", tmp_path / "ev", progress=False, plots=False)
    evaluate(tmp_path / "run", tmp_path / "store", tmp_path / "ev", progress=False, plots=False)
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == [
        "concepts.csv", "report.json", "top_images.safetensors"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsaeError, match="is a file"):
        evaluate(tmp_path / "run", tmp_path / "store", tmp_path / "afile", progress=False)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(arrays, tmp_path):
    """Item 5: Ctrl-C before the first checkpoint lost every step; now SIGINT saves one."""
    np.save(tmp_path / "m0.npy", arrays["m0"])
    store_from_arrays(tmp_path / "store", arrays)
    code = textwrap.dedent(f"""
        import os, signal, sys
        import usae.sae.trainer as t
        real = t.Trainer.train_step
        def step(self, *a, **kw):
            out = real(self, *a, **kw)
            if self.step == 7:
                os.kill(os.getpid(), signal.SIGINT)
            return out
        t.Trainer.train_step = step
        from usae.cli import main
        sys.exit(main(["train", "--store", {str(tmp_path / 'store')!r}, "--out",
                       {str(tmp_path / 'run')!r}, "--max-steps", "12", "--set", "n_concepts=16",
                       "--set", "k=2", "--set", "batch_images=4", "--no-progress"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "re-run with --resume" in r.stderr, r.stderr
    assert run_status(tmp_path / "run") == {"state": "partial", "step": 7, "total_steps": 12}
    assert main(["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"),
                 "--resume", "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12


@pytest.mark.parametrize("argv, msg", [
    (["cache", "--models", "demo", "--images", ".", "--out", "x", "--batch-size", "0"],
     "--batch-size must be at least 1"),
    (["cache", "--models", "demo", "--images", ".", "--out", "x", "--workers", "-2"],
     "--workers must be at least -1"),
    (["cache", "--models", "demo", "--images", ".", "--out", "x", "--val-fraction", "2"],
     "--val-fraction must be less than 1"),
    (["serve", ".", "--port", "80000"], "between 0 and 65535"),
    (["serve", ".", "--port", "-1"], "between 0 and 65535"),
])
def test_simple_mistakes_are_one_line_errors(argv, msg, capsys, tmp_path, monkeypatch):
    """Item 6/7: these raised raw tracebacks."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "index.html").write_text("<html>")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usae {argv[0]}: error: ") and msg in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    assert main(["cache", "--models", "demo", "--images", str(tmp_path), "--out",
                 str(tmp_path / "s"), "--device", "cuda"]) == 2
    assert "CUDA is not available — use --device cpu" in capsys.readouterr().err


def test_bad_config_values_and_npy_files(arrays, tmp_path, capsys):
    store_from_arrays(tmp_path / "store", arrays)
    base = ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "r")]
    for sets, msg in ((["lr=nan"], "finite"), (["n_concepts=-3"], "n_concepts must be positive"),
                      (["dims=1,2"], "come from the store")):
        assert main(base + [x for s in sets for x in ("--set", s)]) == 2
        assert msg in capsys.readouterr().err
    _train(arrays, tmp_path / "run")
    (tmp_path / "text.npy").write_text("hello")
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    for name, msg in (("text.npy", "not a .npy file"), ("str.npy", "expected a numeric")):
        assert main(["encode", str(tmp_path / "run"), "--model", "m0", "--input",
                     str(tmp_path / name), "--out", str(tmp_path / "z.npy")]) == 2
        assert msg in capsys.readouterr().err


def test_partial_runs_warn_when_read(arrays, tmp_path, caplog):
    from usae.sae.model import UniversalSAE

    _train(arrays, tmp_path / "run", steps=12)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["status"] = {"state": "partial", "step": 4, "total_steps": 12}
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        UniversalSAE.load(tmp_path / "run")
    assert "partial run" in caplog.text and "step 4 of 12" in caplog.text


def test_written_files_have_ordinary_modes(arrays, tmp_path):
    """Item 8: manifest and config were 0600 while the arrays were 0644."""
    store_from_arrays(tmp_path / "store", arrays)
    _train(arrays, tmp_path / "run")
    umask = os.umask(0)
    os.umask(umask)
    for f in [tmp_path / "store" / "manifest.json", tmp_path / "run" / "config.json",
              tmp_path / "run" / "model.safetensors"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.slow
def test_version_and_broken_pipe(arrays, tmp_path):
    r = subprocess.run([sys.executable, "-m", "usae", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usae ")
    store_from_arrays(tmp_path / "store", arrays)
    r = subprocess.run(f"{sys.executable} -m usae store info {tmp_path / 'store'} | head -1",
                       shell=True, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr and r.stdout.strip() == "{"


def test_list_file_with_an_unknown_split_is_refused(tmp_path):
    from usae.data.images import list_images

    (tmp_path / "list.txt").write_text("a.jpg,cat,trian\n")
    with pytest.raises(UsaeError, match="unknown split 'trian'"):
        list_images(tmp_path / "list.txt")


def test_concepts_in_the_terminal(arrays, tmp_path, capsys):
    """Item 8: a way to look at concepts without the browser."""
    from usae.analysis.evaluate import evaluate
    from usae.data.sources import StoreSource

    store = store_from_arrays(tmp_path / "store", arrays)
    cfg = resolve(store.models, store.dims, "paper", {"n_concepts": 16, "k": 2,
                                                      "batch_images": 8, "max_steps": 3})
    train_run(cfg, StoreSource(store, "train"), tmp_path / "run", progress=False)
    evaluate(tmp_path / "run", tmp_path / "store", tmp_path / "ev", progress=False,
             plots=False, split="all")
    base = ["concepts", str(tmp_path / "run"), "--eval", str(tmp_path / "ev")]
    assert main(base + ["--top", "3", "--store", str(tmp_path / "store"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    energies = [c["energy"] for c in table]
    assert len(table) == 3 and energies == sorted(energies, reverse=True)
    assert all(p.startswith("array/") for c in table for p in c["top_images"])
    assert main(base + ["--concept", "2,5"]) == 0
    out = capsys.readouterr().out
    assert "concept     2" in out and "concept     5" in out
    assert main(base + ["--concept", "99"]) == 2
    assert "do not exist" in capsys.readouterr().err


def test_a_real_full_disk_then_more_space_resumes_the_store(make_arrays, tmp_path, tiny_tmpfs):
    """ENOSPC from a real filesystem (not injected): a clear error, then, with more space, the
    same command completes with the same content as a store written with room to spare."""
    arrays = make_arrays(n_images=64, tokens=16, dims=(64, 48, 32))  # ~0.6 MB in fp16
    ref = store_from_arrays(tmp_path / "ref", arrays)
    with pytest.raises(UsaeError, match="free some space"):
        store_from_arrays(tiny_tmpfs / "store", arrays)
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_tmpfs)], check=True)
    store = store_from_arrays(tiny_tmpfs / "store", arrays)
    assert store.manifest["content_hash"] == ref.manifest["content_hash"] and store.verify()
