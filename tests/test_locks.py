"""usae.locks, unit by unit: the lock file's place and content, who counts as stale, and the
messages. (tests/test_sweep.py runs the locks through the commands themselves.)"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import exactly
from usae import locks
from usae.errors import UsaeError
from usae.locks import (
    acquire,
    check_not_held_by_another_job,
    job_id,
    lock_path,
    output_lock,
    pid_running,
    release,
)


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _holder(pid: int, host: str | None = None, **extra) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": "usae x",
                       "started": "2026-01-01T00:00:00", **extra})


def test_lock_path_is_a_hidden_sibling_of_the_absolute_folder(tmp_path, monkeypatch):
    assert lock_path(tmp_path / "run") == tmp_path / ".run.usae-lock"
    assert lock_path(str(tmp_path / "a" / "b")) == tmp_path / "a" / ".b.usae-lock"
    monkeypatch.chdir(tmp_path)
    assert lock_path("rel") == tmp_path / ".rel.usae-lock"  # relative: from the cwd
    assert lock_path("x/../y") == tmp_path / ".y.usae-lock"


def test_job_id_needs_both_rendezvous_variables(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert job_id() is None
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert job_id() is None
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert job_id() == "10.0.0.1:29500"
    monkeypatch.delenv("MASTER_ADDR")
    assert job_id() is None


def test_pid_running(dead_pid, live_pid):
    assert pid_running(os.getpid()) and pid_running(live_pid)
    assert pid_running(1)  # init: a real process
    assert not pid_running(dead_pid)


def test_asking_sends_no_signal_that_ends_the_process():
    # (the default action for every signal, even where this test runs under nohup)
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                             "for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):\n"
                             "    signal.signal(s, signal.SIG_DFL)\n"
                             "print('ready', flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert pid_running(proc.pid)
        time.sleep(0.3)
        assert proc.poll() is None  # still running
    finally:
        proc.kill()
        proc.wait()
    assert not pid_running(0) and not pid_running(-1)  # never "every process in the group"


def test_a_pid_of_another_user_counts_as_running(monkeypatch):
    def denied(pid, sig):
        raise PermissionError

    monkeypatch.setattr(locks.os, "kill", denied)
    assert pid_running(12345)


def test_acquire_writes_its_owner_and_creates_the_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(sys, "argv", ["usae", "train", "--out", "x"])
    path = acquire(tmp_path / "deep" / "er" / "out")
    assert path == tmp_path / "deep" / "er" / ".out.usae-lock"
    holder = json.loads(path.read_text())
    assert set(holder) == {"pid", "host", "job", "command", "started"}
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["job"] == "h:1" and holder["command"] == "usae train --out x"
    assert abs(time.mktime(time.strptime(holder["started"][:19], "%Y-%m-%dT%H:%M:%S")) -
               time.time()) < 120
    assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    assert not (tmp_path / "deep" / "er" / "out").exists()  # the lock does not make the folder
    release(path)
    assert acquire(tmp_path / "deep" / "er" / "out", command="mine") == path
    assert json.loads(path.read_text())["command"] == "mine"


def _in_use(out, pid: int, lock) -> str:
    """The refusal naming a live holder written by ``_holder``."""
    return (f"{out} is in use by another usae command (pid {pid} on {socket.gethostname()}: "
            f"`usae x`, since 2026-01-01T00:00:00) — wait for it to finish or choose another "
            f"--out; if that process is gone, delete {lock}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_live_holder_is_refused_with_everything_known_about_it(tmp_path, live_pid):
    lock = lock_path(tmp_path / "out")
    lock.write_text(_holder(live_pid))
    with exactly(_in_use(tmp_path / "out", live_pid, lock)):
        acquire(tmp_path / "out")
    assert json.loads(lock.read_text())["pid"] == live_pid


def test_a_dead_holder_is_named_in_a_warning_and_replaced(tmp_path, dead_pid, caplog):
    lock = lock_path(tmp_path / "out")
    lock.write_text(_holder(dead_pid))
    with caplog.at_level(logging.WARNING, logger="usae.locks"):
        assert acquire(tmp_path / "out") == lock
    assert caplog.messages == [
        f"warning: removing a stale lock on {tmp_path / 'out'} left by pid {dead_pid} on "
        f"{socket.gethostname()}: `usae x`, since 2026-01-01T00:00:00, which is no longer "
        "running"]
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_without_a_pid_on_this_host_is_stale(tmp_path):
    lock = lock_path(tmp_path / "out")
    lock.write_text(json.dumps({"host": socket.gethostname()}))
    assert acquire(tmp_path / "out") == lock


def test_an_empty_lock_is_a_starting_command_until_the_grace_ends(tmp_path, caplog):
    lock = lock_path(tmp_path / "out")
    lock.write_text("")
    with pytest.raises(UsaeError, match=r"\(a usae command that is starting\)"):
        acquire(tmp_path / "out")
    old = time.time() - locks._EMPTY_GRACE_S - 1
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="usae.locks"):
        acquire(tmp_path / "out")
    assert "left by a usae command that is starting" in caplog.text
    lock.write_text("[1, 2]")  # JSON, but not an owner: the same as empty
    with pytest.raises(UsaeError, match="that is starting"):
        acquire(tmp_path / "out")
    lock.write_text("{not json")
    with pytest.raises(UsaeError, match="that is starting"):
        acquire(tmp_path / "out")


def test_an_empty_lock_just_under_the_grace_is_left(tmp_path, monkeypatch):
    lock = lock_path(tmp_path / "out")
    lock.write_text("")
    now = lock.stat().st_mtime
    monkeypatch.setattr(locks.time, "time", lambda: now + locks._EMPTY_GRACE_S)
    with pytest.raises(UsaeError):
        acquire(tmp_path / "out")
    monkeypatch.setattr(locks.time, "time", lambda: now + locks._EMPTY_GRACE_S + 0.01)
    acquire(tmp_path / "out")


def test_a_lock_that_keeps_coming_back_is_given_up_after_three_tries(tmp_path, dead_pid,
                                                                     monkeypatch):
    lock = lock_path(tmp_path / "out")
    lock.write_text(_holder(dead_pid))
    real_unlink = type(lock).unlink
    removed = []

    def unlink_and_recreate(self, missing_ok=False):
        real_unlink(self, missing_ok=missing_ok)
        removed.append(self)
        self.write_text(_holder(dead_pid))  # another command took it meanwhile, and died

    monkeypatch.setattr(type(lock), "unlink", unlink_and_recreate)
    with pytest.raises(UsaeError) as info:
        acquire(tmp_path / "out")
    assert str(info.value) == (f"could not take the lock {lock}: other commands keep taking it "
                               "— run one command per output folder")
    assert removed == [lock] * 3


def test_a_lock_that_vanishes_while_being_checked_is_taken(tmp_path, monkeypatch):
    lock = lock_path(tmp_path / "out")
    lock.write_text("")
    real = locks._read_holder

    def read_then_vanish(path):
        holder = real(path)
        path.unlink()  # its owner released it between our open and our stat
        return holder

    monkeypatch.setattr(locks, "_read_holder", read_then_vanish)
    assert acquire(tmp_path / "out") == lock


def test_a_folder_that_cannot_hold_a_lock_is_a_usae_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsaeError) as info:
        acquire(tmp_path / "file" / "out")
    assert str(info.value) == f"cannot create {tmp_path / 'file'}: File exists"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(UsaeError, match=r"^cannot create the lock .*ro/\.out\.usae-lock: "
                                            r".* — check the folder's permissions"):
            acquire(ro / "out")
    finally:
        ro.chmod(0o700)


def test_an_os_error_opening_the_lock_is_a_usae_error(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(locks.os, "open", full)
    with pytest.raises(UsaeError) as info:
        acquire(tmp_path / "out")
    assert str(info.value) == (f"cannot create the lock {lock_path(tmp_path / 'out')}: No space "
                               "left on device — check the folder's permissions and free space")


def test_release_of_a_lock_removed_meanwhile_is_quiet(tmp_path, monkeypatch):
    path = acquire(tmp_path / "a")
    mine = locks._read_holder(path)
    path.unlink()  # removed by hand between our read and our unlink
    monkeypatch.setattr(locks, "_read_holder", lambda p: mine)
    release(path)


def test_another_jobs_dead_lock_is_no_obstacle(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("MASTER_PORT", "7")
    lock_path(tmp_path / "run").write_text(_holder(dead_pid, job="n1:8"))
    check_not_held_by_another_job(tmp_path / "run")


def test_release_removes_only_our_own_lock(tmp_path, live_pid):
    ours = acquire(tmp_path / "a")
    release(ours)
    assert not ours.exists()
    release(ours)  # already gone: nothing happens
    theirs = lock_path(tmp_path / "b")
    theirs.write_text(_holder(live_pid))
    release(theirs)
    assert theirs.exists()
    elsewhere = lock_path(tmp_path / "c")
    elsewhere.write_text(_holder(os.getpid(), host="another-node"))  # our pid, another host
    release(elsewhere)
    assert elsewhere.exists()
    empty = lock_path(tmp_path / "d")
    empty.write_text("")
    release(empty)
    assert empty.exists()


def test_output_lock_takes_every_folder_once_in_sorted_order(tmp_path, monkeypatch):
    taken = []
    real = locks.acquire

    def record(out, command=None):
        taken.append((out, command))
        return real(out, command)

    monkeypatch.setattr(locks, "acquire", record)
    b, a = tmp_path / "b", tmp_path / "a"
    with output_lock(b, a, str(b), command="cmd"):
        assert lock_path(a).exists() and lock_path(b).exists()
        assert json.loads(lock_path(a).read_text())["command"] == "cmd"
    assert taken == [(str(a), "cmd"), (str(b), "cmd")]
    assert not lock_path(a).exists() and not lock_path(b).exists()


def test_output_lock_releases_what_it_took_when_one_is_held(tmp_path, live_pid):
    lock_path(tmp_path / "b").write_text(_holder(live_pid))
    with pytest.raises(UsaeError, match="in use"):
        with output_lock(tmp_path / "a", tmp_path / "b"):
            pass  # pragma: no cover - never entered
    assert not lock_path(tmp_path / "a").exists()  # a was taken, then given back
    assert lock_path(tmp_path / "b").exists()
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "a"):
            raise RuntimeError("the command failed")
    assert not lock_path(tmp_path / "a").exists()


def test_another_jobs_live_lock_is_refused_with_its_holder(tmp_path, live_pid, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("MASTER_PORT", "7")
    lock = lock_path(tmp_path / "run")
    lock.write_text(_holder(live_pid, job="n1:8"))
    with exactly(_in_use(tmp_path / "run", live_pid, lock)):
        check_not_held_by_another_job(tmp_path / "run")
    lock.write_text(_holder(live_pid, host="other", job="n1:8"))  # not checkable: refused
    with pytest.raises(UsaeError):
        check_not_held_by_another_job(tmp_path / "run")
    lock.write_text(_holder(live_pid))  # no job recorded (a plain command): refused
    with pytest.raises(UsaeError):
        check_not_held_by_another_job(tmp_path / "run")
    lock.write_text(_holder(live_pid, job="n1:7"))  # our own job's rank 0
    check_not_held_by_another_job(tmp_path / "run")
    lock.write_text("")  # rank 0 is writing it: go on
    check_not_held_by_another_job(tmp_path / "run")
