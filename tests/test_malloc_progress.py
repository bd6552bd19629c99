"""usae.malloc (glibc's allocator settings, read back from a fake libc) and usae.progress
(how often a bar redraws on a terminal and in a log)."""

from __future__ import annotations

import io
import sys

import pytest

from usae import malloc, progress


class FakeLibc:
    """Records mallopt calls; answers 1 (done) unless told which option to refuse."""

    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, key: int, value: int) -> int:
        self.calls.append((key, value))
        return 0 if key == self.refuse else 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    loaded = []
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: loaded.append(name) or fake)
    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: f"lib{name}.so.6")
    monkeypatch.setattr(malloc.sys, "platform", "linux")
    fake.loaded = loaded
    return fake


def test_mallopt_constants_are_glibcs():
    # <malloc.h>: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4; defaults 65536 mmaps, 128 KiB trim
    assert malloc.M_TRIM_THRESHOLD == -1 and malloc.M_MMAP_MAX == -4
    assert malloc.GLIBC_DEFAULTS == {-4: 65536, -1: 131072}


def test_keep_freed_memory_stops_mmap_and_trimming(libc):
    assert malloc.keep_freed_memory() is True
    assert libc.calls == [(-4, 0), (-1, 2 ** 30)] and libc.loaded == ["libc.so.6"]
    assert malloc.keep_freed_memory("cpu") is True


def test_verbose_logging_says_whether_it_took_effect(libc, caplog):
    with caplog.at_level("DEBUG", logger="usae.malloc"):
        malloc.keep_freed_memory()
        libc.refuse = -1
        malloc.keep_freed_memory()
    assert caplog.messages == ["glibc malloc: heap-only, untrimmed (on)",
                               "glibc malloc: heap-only, untrimmed (unavailable)"]


def test_default_malloc_restores_glibcs_defaults(libc):
    assert malloc.default_malloc() is True
    assert libc.calls == [(-4, 65536), (-1, 131072)]


def test_a_cuda_device_leaves_malloc_alone(libc):
    assert malloc.keep_freed_memory("cuda") is False
    assert malloc.keep_freed_memory("cuda:1") is False
    assert libc.calls == []


def test_a_refused_setting_is_reported(libc):
    libc.refuse = -1
    assert malloc.keep_freed_memory() is False
    libc.refuse = -4
    assert malloc.default_malloc() is False


def test_without_find_library_the_soname_is_used(libc, monkeypatch):
    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: None)
    assert malloc.keep_freed_memory() is True and libc.loaded == ["libc.so.6"]


def test_not_linux_or_not_glibc_is_a_quiet_false(libc, monkeypatch):
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.keep_freed_memory() is False and libc.calls == []
    monkeypatch.setattr(malloc.sys, "platform", "linux")

    class Musl:  # a libc without mallopt
        pass

    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: Musl())
    assert malloc.keep_freed_memory() is False

    def missing(name):
        raise OSError("cannot load")

    monkeypatch.setattr(malloc.ctypes, "CDLL", missing)
    assert malloc.default_malloc() is False


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_bar_redraws_often(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.bar(total=3, disable=False, file=sys.stderr)
    assert bar.mininterval == 0.2 and callable(bar.dynamic_ncols)  # (tqdm's width reader)
    bar.close()


def test_a_logged_bar_redraws_every_15_s(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress.bar(total=3, file=sys.stderr)
    assert bar.mininterval == 15.0 and bar.total == 3
    bar.close()


def test_a_stderr_without_isatty_is_a_log(monkeypatch):
    class Bare:
        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Bare())
    bar = progress.bar(total=1, file=io.StringIO())
    assert bar.mininterval == 15.0
    bar.close()


def test_a_callers_own_settings_win(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.bar(total=2, mininterval=1.0, dynamic_ncols=False, file=io.StringIO(),
                       desc="encode")
    assert bar.mininterval == 1.0 and bar.dynamic_ncols is False and bar.desc == "encode"
    bar.close()
