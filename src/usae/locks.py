"""One command's output at a time: a lock file beside each output folder.

``usae`` commands that write a folder hold ``.<name>.usae-lock`` in the folder's parent while
they run (beside, not inside: eval, explore and merge swap their folder in whole at the end).
The lock holds the owner's pid, host, command and start time as JSON and is created with
``O_EXCL``, so of two commands started at once exactly one gets it.

A lock left by a killed process (same host, pid no longer running) is *stale*: the next
command says so in a warning naming the dead process, removes it and goes on, so that
kill -9 and a re-run still resumes. A lock whose owner runs on another host (a shared
filesystem) cannot be checked from here and is never broken: the command refuses and says
which file to delete once that process is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from usae.errors import UsaeError

log = logging.getLogger(__name__)
_EMPTY_GRACE_S = 5.0  # a lock file still empty after this long was cut short by a kill


def job_id() -> str | None:
    """This torchrun job's rendezvous address (MASTER_ADDR:MASTER_PORT), None outside one:
    the ranks of one job share it, two live jobs never do."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def lock_path(out: str | Path) -> Path:
    """The lock file of output folder ``out``: ``<parent>/.<name>.usae-lock``."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.usae-lock"


def pid_running(pid: int) -> bool:
    """True when a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's owner, or None when the file is empty or unreadable (being written, or
    cut short by a kill)."""
    try:
        obj = json.loads(path.read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_stale(path: Path, holder: dict[str, Any] | None) -> bool:
    if holder is None:  # created but never written: stale once it is old enough
        try:
            return time.time() - path.stat().st_mtime > _EMPTY_GRACE_S
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and \
        not pid_running(int(holder.get("pid", -1)))


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a usae command that is starting"
    return (f"pid {holder.get('pid')} on {holder.get('host')}: `{holder.get('command')}`, "
            f"since {holder.get('started')}")


def acquire(out: str | Path, command: str | None = None) -> Path:
    """Take ``out``'s lock or raise ``UsaeError`` naming its holder; returns the lock path."""
    path = lock_path(out)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_id(),
          "command": command or " ".join(["usae", *sys.argv[1:]]),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsaeError(f"cannot create {path.parent}: {err.strerror or err}") from None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if not _is_stale(path, holder):
                raise UsaeError(f"{out} is in use by another usae command ({_describe(holder)})"
                                f" — wait for it to finish or choose another --out; if that "
                                f"process is gone, delete {path}") from None
            log.warning("warning: removing a stale lock on %s left by %s, which is no longer "
                        "running", out, _describe(holder))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as err:
            raise UsaeError(f"cannot create the lock {path}: {err.strerror or err} — check the "
                            "folder's permissions and free space") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        return path
    raise UsaeError(f"could not take the lock {path}: other commands keep taking it — run "
                    "one command per output folder")


def check_not_held_by_another_job(out: str | Path) -> None:
    """For a torchrun rank that does not take the lock itself (rank 0 does): refuse at once,
    as rank 0 will, when a live command of another job holds ``out`` (instead of waiting for
    rank 0 until the process group's timeout). A lock of this job, a stale one or none: go on."""
    path = lock_path(out)
    holder = _read_holder(path)
    if holder is None or _is_stale(path, holder) or holder.get("job") == job_id():
        return
    raise UsaeError(f"{out} is in use by another usae command ({_describe(holder)}) — wait for "
                    f"it to finish or choose another --out; if that process is gone, delete "
                    f"{path}")


def release(path: Path) -> None:
    """Remove a lock this process holds (a lock taken over by another process is left)."""
    holder = _read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and \
            holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_lock(*outs: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold the locks of every folder in ``outs`` for the block (taken in sorted order)."""
    held: list[Path] = []
    try:
        for out in sorted({os.path.abspath(o) for o in outs}):
            held.append(acquire(out, command))
        yield
    finally:
        for path in reversed(held):
            release(path)
