"""Reliability, second sweep: each item of the new-user trial (issue 22), reproduced and pinned.

Every test here failed on the code before the fix it names."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from usae.cli import main
from usae.config import resolve
from usae.data.sources import ArraySource
from usae.errors import UsaeError
from usae.files import atomic_write_json, finite_json, os_error_inside
from usae.locks import acquire, lock_path, output_lock, release
from usae.sae.checkpoint import read_checkpoint_position
from usae.sae.run import read_run_json, run_status
from usae.sae.training import train_run
from usae.store.writer import store_from_arrays

SMALL = ["--set", "n_concepts=16", "--set", "k=2", "--set", "batch_images=4", "--no-progress"]


def _train_cli(store: Path, out: Path, *extra: str) -> int:
    return main(["train", "--store", str(store), "--out", str(out), "--max-steps", "6", *SMALL,
                 *extra])


@pytest.fixture
def store(arrays, tmp_path) -> Path:
    store_from_arrays(tmp_path / "store", arrays)
    return tmp_path / "store"


# ---- one command per output folder (items 3, and the general rule) ----------------------
def test_a_folder_in_use_is_refused_with_its_holder(store, tmp_path, capsys):
    """Item 3: two `train --force` into one folder both 'succeeded' and mixed their files."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = lock_path(tmp_path / "run")
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                    "command": "usae train --out run", "started": "now"}))
        assert _train_cli(store, tmp_path / "run", "--force") == 2
        err = capsys.readouterr().err
        assert err.startswith("usae train: error: ") and err.count("\n") == 1
        assert f"is in use by another usae command (pid {sleeper.pid}" in err
        assert "`usae train --out run`" in err and str(lock) in err
        assert not (tmp_path / "run").exists()  # nothing written
        assert lock.exists()  # and the holder's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_reported_then_taken_over(store, tmp_path, caplog):
    """kill -9 leaves the lock behind: the next command names the dead process and goes on."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = lock_path(tmp_path / "run")
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                "command": "usae train (killed)", "started": "then"}))
    with caplog.at_level("WARNING"):
        assert _train_cli(store, tmp_path / "run") == 0
    assert f"removing a stale lock on {tmp_path / 'run'} left by pid {dead.pid}" in caplog.text
    assert not lock.exists()  # released at the end


def test_a_lock_from_another_host_is_never_broken(tmp_path):
    lock = lock_path(tmp_path / "out")
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "command": "usae cache",
                                "started": "now"}))
    with pytest.raises(UsaeError, match="pid 1 on another-node"):
        acquire(tmp_path / "out")
    assert lock.exists()


def test_the_lock_is_exclusive_and_released_only_by_its_owner(tmp_path):
    with output_lock(tmp_path / "a", command="first"):
        holder = json.loads(lock_path(tmp_path / "a").read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "first"
        with pytest.raises(UsaeError, match="in use by another usae command"):
            acquire(tmp_path / "a")
    assert not lock_path(tmp_path / "a").exists()
    lock_path(tmp_path / "b").write_text(json.dumps({"pid": 1, "host": "x"}))
    release(lock_path(tmp_path / "b"))  # not ours: left
    assert lock_path(tmp_path / "b").exists()


# ---- store merge and push never destroy what they did not write (items 1, 2, 9) -----------
def test_push_keeps_a_readme_the_user_wrote(store, tmp_path, capsys):
    _train_cli(store, tmp_path / "run")
    mine = tmp_path / "run" / "README.md"
    mine.write_text("# my notes\n")
    assert main(["push", str(tmp_path / "run"), "me/x", "--dry-run"]) == 2
    assert "was not written by usae push — move it away, or pass --force" in \
        capsys.readouterr().err
    assert mine.read_text() == "# my notes\n"
    assert main(["push", str(tmp_path / "run"), "me/x", "--dry-run", "--force"]) == 0
    assert main(["push", str(tmp_path / "run"), "me/y", "--dry-run"]) == 0  # ours: rewritten
    assert 'UniversalSAE.load("hf://me/y")' in mine.read_text()


def test_push_refuses_truncated_weights(store, tmp_path, capsys):
    _train_cli(store, tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["push", str(tmp_path / "run"), "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot be shared" in err and "not a valid safetensors file" in err
    assert not (tmp_path / "run" / "README.md").exists()


# ---- interrupted training keeps what it promised (item 4) ---------------------------------
def test_a_second_ctrl_c_during_the_save_waits_for_the_checkpoint(store, tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        import usae.sae.trainer as t
        real_step, real_save = t.Trainer.train_step, t.Trainer.save_checkpoint
        def step(self, *a, **kw):
            out = real_step(self, *a, **kw)
            if self.step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return out
        def save(self):
            if self.step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
            real_save(self)
        t.Trainer.train_step, t.Trainer.save_checkpoint = step, save
        from usae.cli import main
        sys.exit(main(["train", "--store", {str(store)!r}, "--out", {str(tmp_path / 'run')!r},
                       "--max-steps", "12", *{SMALL!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "a checkpoint of step 3 was saved" in r.stderr, r.stderr
    assert read_checkpoint_position(tmp_path / "run" / "checkpoint.safetensors")["step"] == 3
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "run"), "--resume",
                 "--no-progress"]) == 0
    assert run_status(tmp_path / "run")["state"] == "final"


def test_a_second_ctrl_c_mid_step_says_what_was_kept(store, tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        import usae.sae.trainer as t
        real_step = t.Trainer.train_step
        def step(self, *a, **kw):
            if self.step == 5:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(self, *a, **kw)
        t.Trainer.train_step = step
        from usae.cli import main
        sys.exit(main(["train", "--store", {str(store)!r}, "--out", {str(tmp_path / 'run')!r},
                       "--max-steps", "12", "--set", "checkpoint_every=4", *{SMALL!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert "the last checkpoint (step 4) was kept — re-run with --resume" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---- resume checks its data and its preset (items 5, 14) ----------------------------------
def test_resume_refuses_another_split_store_or_preset(store, arrays, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--store", str(store), "--out", str(run), "--max-steps", "12", *SMALL,
                 "--set", "checkpoint_every=4"])
    assert code == 0
    assert read_run_json(run)["split"] == "train"
    other = {m: a[::-1].copy() for m, a in arrays.items()}
    store_from_arrays(tmp_path / "other", other)
    before = (run / "config.json").read_text()
    for extra, msg in ((["--split", "val"], "it was trained on split 'train'"),
                       (["--preset", "best"], "trained with preset 'paper'")):
        assert main(["train", "--store", str(store), "--out", str(run), "--resume",
                     *extra]) == 2
        assert msg in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path / "other"), "--out", str(run),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "on other data" in err, err
    assert (run / "config.json").read_text() == before
    assert main(["train", "--store", str(store), "--out", str(run), "--resume",
                 "--preset", "paper", "--no-progress"]) == 0


# ---- an eval belongs to one run (item 6) --------------------------------------------------
def test_an_eval_of_another_run_is_refused(store, tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 1)):
        assert _train_cli(store, tmp_path / name, "--set", f"seed={seed}") == 0
    assert main(["eval", str(tmp_path / "a"), "--store", str(store), "--out",
                 str(tmp_path / "ev"), "--no-plots"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["run"]["step"] == 6 and report["run"]["path"] == "a"  # no machine path
    assert len(report["run"]["weights_sha256"]) == 64
    for argv in (["push", str(tmp_path / "b"), "me/x", "--dry-run", "--eval", str(tmp_path / "ev")],
                 ["concepts", str(tmp_path / "b"), "--eval", str(tmp_path / "ev")],
                 ["explore", str(tmp_path / "b"), "--store", str(store), "--out",
                  str(tmp_path / "x"), "--eval", str(tmp_path / "ev")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is an eval of another run" in err and "usae eval" in err, err
    assert main(["concepts", str(tmp_path / "a"), "--eval", str(tmp_path / "ev"),
                 "--concept", "16"]) == 2
    assert "concepts 0..15" in capsys.readouterr().err
    assert main(["concepts", str(tmp_path / "a"), "--eval", str(tmp_path / "ev")]) == 0


# ---- no NaN in any JSON file (item 7) ----------------------------------------------------
def test_json_files_hold_no_nan_or_infinity(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": math.nan, "b": [1.0, math.inf, -math.inf],
                                            "c": {"d": 2.5}})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.0, None, None], "c": {"d": 2.5}}
    assert finite_json((math.nan, 1)) == [None, 1]


# ---- a run too short to mean anything says so (item 8) ------------------------------------
def test_a_run_that_ends_in_its_warmup_warns(store, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert main(["train", "--store", str(store), "--out", str(tmp_path / "r"),
                     "--no-progress", "--set", "n_concepts=16", "--set", "k=2"]) == 0
    assert "this run has only 1 steps" in caplog.text and "too short" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["train", "--store", str(store), "--out", str(tmp_path / "r2"),
                     "--max-steps", "60", *SMALL]) == 0
    assert "too short" not in caplog.text


# ---- a full disk is one line, never a Rust error (item 10) --------------------------------
def test_safetensors_disk_errors_become_os_errors():
    err = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                       'message: "No space left on device" })')
    assert os_error_inside(err).errno == 28
    err = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert os_error_inside(err).errno == 28
    assert os_error_inside(RuntimeError("shape mismatch")) is None


def test_a_real_full_disk_during_train_and_encode_is_one_line(arrays, tmp_path, tiny_tmpfs,
                                                              capsys):
    store_from_arrays(tmp_path / "store", arrays)
    argv = ["train", "--store", str(tmp_path / "store"), "--out", str(tiny_tmpfs / "run"),
            "--max-steps", "4", "--set", "n_concepts=4096", "--set", "k=2",
            "--set", "batch_images=4", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device — free some space" in err, err
    assert "Safetensor" not in err and "IoError" not in err
    assert _train_cli(tmp_path / "store", tmp_path / "run") == 0
    np.save(tmp_path / "x.npy", np.zeros((20000, 12), np.float32))
    assert main(["encode", str(tmp_path / "run"), "--model", "m0", "--input",
                 str(tmp_path / "x.npy"), "--out", str(tiny_tmpfs / "z.npy")]) == 2
    err = capsys.readouterr().err
    assert "free some space" in err and "permissions" not in err, err


# ---- bad seeds, Ctrl-C at start, help texts (items 11, 12, 16) ----------------------------
@pytest.mark.parametrize("seed", ["-5", str(2**64)])
def test_bad_seeds_are_one_line_and_leave_nothing(store, tmp_path, capsys, seed):
    assert _train_cli(store, tmp_path / "run", "--set", f"seed={seed}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed must be an integer from 0 to" in err
    assert not (tmp_path / "run").exists()
    assert _train_cli(store, tmp_path / "run") == 0  # no --force needed


def test_ctrl_c_while_torch_imports_is_quiet():
    code = textwrap.dedent("""
        import sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["usae", "store", "info", "nowhere"]
        from usae.cli import entry
        entry()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert "interrupted" in r.stderr


def test_serve_never_imports_torch():
    code = ("import sys; import usae.commands, usae.explorer.serve, usae.locks; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_negated_switches_say_their_default_plainly(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "do not:" not in text and "(default: True)" not in text
    assert "(default: on; --no-plots turns it" in text


# ---- library-level resume check (the same rule without the CLI) ---------------------------
def test_train_run_records_the_split_and_checks_it_on_resume(arrays, tmp_path):
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "paper",
                  {"n_concepts": 16, "k": 3, "batch_images": 8, "max_steps": 4})
    train_run(cfg, ArraySource(arrays), tmp_path / "r", progress=False, extra={"split": "a"})
    with pytest.raises(UsaeError, match="trained on split 'a'"):
        train_run(cfg, ArraySource(arrays), tmp_path / "r", resume=True, progress=False,
                  extra={"split": "b"})


def test_signals_are_restored_after_training(store, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    assert _train_cli(store, tmp_path / "run") == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_hub_runs_are_not_written_into_the_download_cache(tmp_path):
    from usae.cam.maximize import run_cam
    from usae.hub import push

    with pytest.raises(UsaeError, match="pass --out DIR"):
        run_cam("hf://me/run", tmp_path, [1])
    with pytest.raises(UsaeError, match="push takes a local run folder"):
        push("hf://me/run", "me/x", dry_run=True)


# ---- a busy machine (item 17) -------------------------------------------------------------
def test_threads_leave_the_busy_cores_alone(monkeypatch):
    """benchmarks/threads.py: beside one busy core, torch's two threads ran 2.2x slower than
    the count chosen here; on a quiet machine the choice is torch's default."""
    import torch

    from usae import threads

    assert threads.threads_for(2, 0.1) == 2 and threads.threads_for(2, 1.2) == 1
    assert threads.threads_for(8, 2.6) == 5 and threads.threads_for(4, 9.0) == 1
    assert threads.threads_for(4, None) == 4
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        set_to = []
        monkeypatch.setattr(torch, "set_num_threads", set_to.append)
        monkeypatch.setattr(threads, "busy_cores", lambda: 1.3)
        assert threads.choose_threads() == 1 and set_to == [1]
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.2)
        assert threads.choose_threads() is None
        monkeypatch.setenv("USAE_THREADS", "all")
        monkeypatch.setattr(threads, "busy_cores", lambda: 1.3)
        assert threads.choose_threads() is None
        monkeypatch.setenv("USAE_THREADS", "3")
        assert threads.choose_threads() == 3 and set_to[-1] == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.choose_threads() is None
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)


def test_busy_cores_reads_proc_stat():
    from usae.threads import busy_cores

    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 0.01


def test_resume_uses_the_runs_own_thread_count(arrays, tmp_path, monkeypatch):
    """CPU sums can round differently on another thread count: a resumed run keeps the count
    its checkpoint recorded (unless the user sets one), so it stays bit-identical."""
    import torch

    from usae.sae.trainer import Trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("USAE_THREADS", raising=False)
    before = torch.get_num_threads()
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "paper",
                  {"n_concepts": 16, "k": 3, "batch_images": 8, "max_steps": 4})
    try:
        torch.set_num_threads(2)
        train_run(cfg, ArraySource(arrays), tmp_path / "r", progress=False)
        assert read_checkpoint_position(tmp_path / "r" / "checkpoint.safetensors")[
            "threads"] == 2
        torch.set_num_threads(1)
        Trainer(cfg, tmp_path / "r", progress=False).load_checkpoint()
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("USAE_THREADS", "1")
        torch.set_num_threads(1)
        Trainer(cfg, tmp_path / "r", progress=False).load_checkpoint()
        assert torch.get_num_threads() == 1  # the user's choice wins
    finally:
        torch.set_num_threads(before)


def test_other_torchrun_ranks_refuse_another_jobs_lock_at_once(tmp_path, monkeypatch):
    """Rank 0 takes the lock; the other ranks refuse a live lock of another job (they used to
    wait for rank 0 until the process group's timeout) and accept their own job's."""
    from usae.locks import check_not_held_by_another_job

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = lock_path(tmp_path / "run")
        holder = {"pid": sleeper.pid, "host": socket.gethostname(), "command": "usae train",
                  "started": "now", "job": "127.0.0.1:29500"}
        lock.write_text(json.dumps(holder))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        check_not_held_by_another_job(tmp_path / "run")  # our own rank 0's lock
        monkeypatch.setenv("MASTER_PORT", "29501")
        with pytest.raises(UsaeError, match="in use by another usae command"):
            check_not_held_by_another_job(tmp_path / "run")
        monkeypatch.setenv("RANK", "1")
        assert main(["train", "--store", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "run")]) == 2
        check_not_held_by_another_job(tmp_path / "free")  # no lock at all
    finally:
        sleeper.kill()
        sleeper.wait()
    check_not_held_by_another_job(tmp_path / "run")  # its holder is gone: stale, go on
    with output_lock(tmp_path / "mine"):
        assert json.loads(lock_path(tmp_path / "mine").read_text())["job"] == "127.0.0.1:29501"
