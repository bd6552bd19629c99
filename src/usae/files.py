"""Atomic file writes and safe tensor loading (safetensors only: nothing is unpickled)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from usae.errors import UsaeError

if TYPE_CHECKING:  # torch is imported where tensors are written: `usae serve` never needs it
    import torch


def atomic_write_with(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, fsync, rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        os_err = err if isinstance(err, OSError) else os_error_inside(err)
        if os_err is not None:
            raise write_error(path, os_err) from None
        raise


def os_error_inside(err: BaseException) -> OSError | None:
    """The operating-system error a library reported in its own exception type (safetensors'
    Rust writer says ``... (os error 28)`` or ``IoError(Os { code: 28, ... })`` for a full
    disk), or None."""
    match = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(err))
    if match is None:
        return None
    code = int(match.group(1) or match.group(2))
    return OSError(code, os.strerror(code))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files that an atomic write left behind when its process was killed."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)


def write_error(path: Path, err: OSError) -> UsaeError:
    """A failed write as a one-line error that says what to do."""
    # NumPy reports a full disk as a short write ("N requested and M written"), no errno
    short_write = err.errno is None and re.search(r"\d+ requested and \d+ written", str(err))
    full = err.errno in (errno.ENOSPC, errno.EDQUOT) or short_write
    hint = ("free some space and re-run the same command (finished work is kept)" if full else
            "check the folder's permissions and re-run")
    what = "no space left on the device (a short write)" if short_write else \
        (err.strerror or err)
    return UsaeError(f"cannot write {path}: {what} — {hint}")


@contextlib.contextmanager
def replace_folder(out: str | Path, marker: str, force: bool = False,
                   what: str = "output") -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in only when the block succeeds.

    ``out`` may be absent or empty, hold ``marker`` (written earlier by the same command: it
    is replaced), or, with ``force``, hold anything. Otherwise it is refused untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsaeError(f"{out} is a file, not a folder — choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / marker).exists() and not force:
        raise UsaeError(f"{out} is not empty and is not a usae {what} folder — pass --force "
                        "to replace it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise write_error(out, err) from None
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise write_error(out, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write_with(Path(path), write)


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``): strict JSON
    parsers reject ``NaN``, so no file usae writes holds one; ``null`` reads as undefined."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no NaN or Infinity: see ``finite_json``)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict[str, "torch.Tensor"],
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_with(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path: str | Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise UsaeError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise UsaeError(f"{path} is not a valid safetensors file: {err}") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsaeError(f"missing {what} {path}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UsaeError(f"{what} {path} is corrupt: {err}") from None


def human_bytes(size: float) -> str:
    """1234567 -> '1.23 MB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size} B"
