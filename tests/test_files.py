"""usae.files: atomic writes, folder swaps, strict JSON and safe tensor loading.

Each test checks a write against what the file system shows afterwards (bytes, modes, the
folder's listing), not against what the function returned."""

from __future__ import annotations

import errno
import json
import math
import os
import stat

import pytest

from usae import files
from usae.errors import UsaeError
from usae.files import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    finite_json,
    human_bytes,
    json_text,
    load_safetensors,
    os_error_inside,
    read_json,
    remove_stale_temps,
    replace_folder,
    write_error,
)


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- atomic writes ------------------------------------------------------------------------
def test_atomic_write_text_makes_parents_and_leaves_only_the_file(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    assert _listing(target.parent) == ["out.txt"]  # no temp file left beside it
    atomic_write_text(str(target), "second")  # a str path; replaces the old content
    assert target.read_text() == "second"


def test_an_atomic_write_gets_a_normal_files_mode(tmp_path):
    """mkstemp makes 0600; the written file gets what open() would give it (0666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "f", "x")
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~mask


def test_the_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert files._current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(before)


def test_the_temp_file_is_hidden_beside_the_target(tmp_path):
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        with open(tmp, "w") as fh:
            fh.write("data")

    atomic_write_with(tmp_path / "out.json", write)
    name = os.path.basename(seen[0])
    assert os.path.dirname(seen[0]) == str(tmp_path)
    assert name.startswith(".out.json.") and name.endswith(".tmp")
    assert not os.path.exists(seen[0]) and (tmp_path / "out.json").read_text() == "data"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise ValueError("the writer broke")

    with pytest.raises(ValueError, match="the writer broke"):  # not an OS error: as it was
        atomic_write_with(target, broken)
    assert target.read_text() == "old" and _listing(tmp_path) == ["keep.txt"]


def test_a_full_disk_inside_a_library_error_becomes_one_line(tmp_path):
    def full(tmp: str) -> None:
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull"
                           " })")

    with pytest.raises(UsaeError) as info:
        atomic_write_with(tmp_path / "w.safetensors", full)
    message = str(info.value)
    assert message.startswith(f"cannot write {tmp_path / 'w.safetensors'}: ")
    assert os.strerror(errno.ENOSPC) in message and "free some space" in message
    assert _listing(tmp_path) == []


def test_an_os_error_while_writing_names_the_file_and_a_fix(tmp_path):
    def denied(tmp: str) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(UsaeError) as info:
        atomic_write_with(tmp_path / "x.txt", denied)
    assert str(info.value) == (f"cannot write {tmp_path / 'x.txt'}: {os.strerror(errno.EACCES)}"
                               " — check the folder's permissions and re-run")
    assert _listing(tmp_path) == []


def test_ctrl_c_during_a_write_removes_the_temp_and_propagates(tmp_path):
    def interrupted(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(tmp_path / "x", interrupted)
    assert _listing(tmp_path) == []


def test_a_write_whose_folder_cannot_be_made_is_a_usae_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UsaeError, match=r"cannot write .*file.*x\.txt: .* — check the"):
        atomic_write_text(tmp_path / "file" / "x.txt", "data")


# ---- what a library's error says about the OS -------------------------------------------
@pytest.mark.parametrize("text, code", [
    ("IoError(Os { code: 28, kind: StorageFull, message: \"No space left\" })", 28),
    ("failed to write (os error 122)", 122),
    ("Os { code: 5, kind: Other }", 5),
])
def test_os_error_inside_reads_both_spellings(text, code):
    err = os_error_inside(RuntimeError(text))
    assert isinstance(err, OSError) and err.errno == code and err.strerror == os.strerror(code)


def test_os_error_inside_finds_nothing_in_other_errors():
    assert os_error_inside(RuntimeError("os error")) is None
    assert os_error_inside(ValueError("code: 28")) is None


# ---- write_error's wording --------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_says_free_some_space(tmp_path, code):
    err = write_error(tmp_path / "f", OSError(code, os.strerror(code)))
    assert isinstance(err, UsaeError)
    assert str(err) == (f"cannot write {tmp_path / 'f'}: {os.strerror(code)} — free some space "
                        "and re-run the same command (finished work is kept)")


def test_numpys_short_write_is_a_full_disk(tmp_path):
    err = write_error(tmp_path / "a.npy", OSError("100 requested and 40 written"))
    assert str(err) == (f"cannot write {tmp_path / 'a.npy'}: no space left on the device (a "
                        "short write) — free some space and re-run the same command (finished "
                        "work is kept)")


def test_an_error_without_strerror_says_itself(tmp_path):
    err = write_error(tmp_path / "f", OSError("something odd"))
    assert str(err) == f"cannot write {tmp_path / 'f'}: something odd — check the folder's " \
                       "permissions and re-run"


def test_a_short_write_with_an_errno_is_not_read_as_one(tmp_path):
    err = write_error(tmp_path / "f", OSError(errno.EIO, "3 requested and 1 written"))
    assert "free some space" not in str(err) and "3 requested and 1 written" in str(err)


# ---- replace_folder ---------------------------------------------------------------------
def test_replace_folder_swaps_in_the_new_folder_only_on_success(tmp_path):
    out = tmp_path / "out"
    with replace_folder(out, "marker.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        assert tmp.name.endswith(".partial") and not out.exists()
        (tmp / "marker.json").write_text("{}")
        (tmp / "data").write_text("1")
    assert _listing(out) == ["data", "marker.json"]
    assert _listing(tmp_path) == ["out"]  # no .partial, no .old left
    with pytest.raises(RuntimeError):
        with replace_folder(out, "marker.json") as tmp:
            (tmp / "marker.json").write_text("{}")
            raise RuntimeError("boom")
    assert (out / "data").read_text() == "1" and _listing(tmp_path) == ["out"]
    with replace_folder(out, "marker.json") as tmp:  # a folder of its own kind: replaced
        (tmp / "marker.json").write_text("{}")
    assert _listing(out) == ["marker.json"] and _listing(tmp_path) == ["out"]


def test_replace_folder_refuses_what_it_did_not_write(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsaeError, match=r"f is a file, not a folder — choose another --out"):
        with replace_folder(tmp_path / "f", "m"):
            pass
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(UsaeError) as info:
        with replace_folder(mine, "m", what="eval"):
            pass
    assert str(info.value) == (f"{mine} is not empty and is not a usae eval folder — pass "
                               "--force to replace it, or choose another --out")
    assert (mine / "thesis.tex").read_text() == "precious"
    with replace_folder(tmp_path / "empty", "m") as tmp:  # absent: fine
        (tmp / "m").write_text("")
    (tmp_path / "bare").mkdir()
    with replace_folder(tmp_path / "bare", "m") as tmp:  # empty: fine
        (tmp / "m").write_text("")
    with replace_folder(mine, "m", force=True) as tmp:  # forced: replaced
        (tmp / "m").write_text("")
    assert _listing(mine) == ["m"]


def test_replace_folder_clears_an_old_copy_left_by_a_kill(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m").write_text("")
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "junk").write_text("left by a kill between the two renames")
    with replace_folder(out, "m") as tmp:
        (tmp / "m").write_text("new")
    assert (out / "m").read_text() == "new" and not old.exists()


def test_replace_folder_that_cannot_make_its_temp_is_a_usae_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsaeError, match=r"cannot write .*file/out: "):
        with replace_folder(tmp_path / "file" / "out", "m"):
            pass


def test_a_swap_that_fails_is_a_usae_error_and_removes_the_temp(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def no_rename(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UsaeError, match="free some space"):
        with replace_folder(out, "m") as tmp:
            (tmp / "m").write_text("")
            monkeypatch.setattr(files.os, "replace", no_rename)
    monkeypatch.undo()
    assert _listing(tmp_path) == []


# ---- stale temps ------------------------------------------------------------------------
def test_a_temp_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    from pathlib import Path

    (tmp_path / ".x.tmp").write_text("")
    real = Path.unlink

    def raced(self, missing_ok=False):
        real(self)  # another process removed it first
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", raced)
    remove_stale_temps(tmp_path)
    assert _listing(tmp_path) == []


def test_remove_stale_temps_removes_only_hidden_temp_files(tmp_path):
    for name in (".a.json.x1.tmp", ".b.tmp", "visible.tmp", ".hidden", "data.json"):
        (tmp_path / name).write_text("")
    (tmp_path / ".dir.tmp").mkdir()  # a folder is never a temp file
    remove_stale_temps(tmp_path)
    assert _listing(tmp_path) == [".dir.tmp", ".hidden", "data.json", "visible.tmp"]
    remove_stale_temps(tmp_path / "absent")  # nothing to do, no error


# ---- strict JSON ------------------------------------------------------------------------
def test_finite_json_replaces_every_non_finite_float_at_any_depth():
    obj = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": math.nan, "e": "x"},
           "f": 3, "g": None, "h": True}
    assert finite_json(obj) == {"a": None, "b": [1.5, None, [None, 2]],
                                "c": {"d": None, "e": "x"}, "f": 3, "g": None, "h": True}
    assert finite_json(0.25) == 0.25 and finite_json("nan") == "nan"


def test_json_text_is_strict_and_passes_options_through():
    assert json_text({"b": math.nan, "a": 1}, sort_keys=True) == '{"a": 1, "b": null}'
    assert json.loads(json_text([math.inf], indent=2)) == [None]
    assert json_text([1], indent=2) == "[\n  1\n]"
    with pytest.raises(TypeError):  # not JSON at all: said, not hidden
        json_text({"x": object()})


def test_atomic_write_json_keeps_key_order_and_ends_with_a_newline(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"z": 1, "a": math.nan})
    assert (tmp_path / "r.json").read_text() == '{\n  "z": 1,\n  "a": null\n}\n'


def test_read_json_names_a_missing_or_corrupt_file(tmp_path):
    (tmp_path / "ok.json").write_text('{"x": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"x": [1, 2]}
    assert read_json(str(tmp_path / "ok.json")) == {"x": [1, 2]}
    with pytest.raises(UsaeError) as info:
        read_json(tmp_path / "none.json", "run file")
    assert str(info.value) == f"missing run file {tmp_path / 'none.json'}"
    (tmp_path / "bad.json").write_text('{"x": ')
    with pytest.raises(UsaeError, match=r"^report .*bad\.json is corrupt: Expecting value"):
        read_json(tmp_path / "bad.json", "report")
    with pytest.raises(UsaeError, match=r"^file .*bad\.json is corrupt"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(UsaeError, match=r"^file .* is corrupt"):  # a folder: an OSError
        read_json(tmp_path)


# ---- safetensors ------------------------------------------------------------------------
def test_safetensors_round_trip_is_exact_and_detached(tmp_path):
    import torch
    from safetensors import safe_open

    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4).t().requires_grad_(True)
    atomic_save_safetensors(tmp_path / "w.safetensors", {"w": weight * 1}, {"kind": "test"})
    back = load_safetensors(str(tmp_path / "w.safetensors"))
    assert list(back) == ["w"] and torch.equal(back["w"], weight.detach())
    assert not back["w"].requires_grad
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as fh:
        assert fh.metadata() == {"kind": "test"}
    assert _listing(tmp_path) == ["w.safetensors"]


def test_load_safetensors_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(UsaeError) as info:
        load_safetensors(tmp_path / "none.safetensors")
    assert str(info.value) == f"missing weights file {tmp_path / 'none.safetensors'}"
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(UsaeError, match=r"pickle\.safetensors is not a valid safetensors file: "):
        load_safetensors(tmp_path / "pickle.safetensors")


# ---- human_bytes ------------------------------------------------------------------------
@pytest.mark.parametrize("size, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (1234567, "1.23 MB"),
    (999_999, "1000.00 KB"), (5e9, "5.00 GB"), (2.5e12, "2.50 TB"), (4e15, "4000.00 TB"),
])
def test_human_bytes(size, text):
    assert human_bytes(size) == text
