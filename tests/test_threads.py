"""usae.threads: the busy cores read from a /proc/stat we write, and the count chosen from
them worked out by hand."""

from __future__ import annotations

import builtins
import io
import logging

import pytest
import torch

from usae import threads


def _stat_line(user, nice, system, idle, iowait=None, *rest) -> str:
    fields = [user, nice, system, idle] + ([] if iowait is None else [iowait, *rest])
    return "cpu  " + " ".join(str(v) for v in fields) + "\ncpu0 1 2 3 4\n"


@pytest.fixture
def proc_stat(monkeypatch):
    """Serve the given /proc/stat texts in turn to threads' open()."""
    texts: list[str] = []
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/stat":
            if not texts:
                raise FileNotFoundError(path)
            return io.StringIO(texts.pop(0))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    return texts


def test_cpu_times_counts_iowait_as_idle(proc_stat):
    # busy = user + nice + system + irq + softirq + steal; idle = idle + iowait
    proc_stat.append(_stat_line(100, 5, 50, 1000, 40, 3, 2, 1))
    assert threads._cpu_times() == (161, 1201)
    proc_stat.append(_stat_line(10, 0, 5, 200))  # an old kernel: four fields, no iowait
    assert threads._cpu_times() == (15, 215)
    proc_stat.append(_stat_line(10, 0, 5, 200, 7))  # five fields: iowait is the fifth
    assert threads._cpu_times() == (15, 222)


def test_cpu_times_without_proc_stat_is_none(proc_stat):
    assert threads._cpu_times() is None
    proc_stat.append("cpu  a b c d\n")
    assert threads._cpu_times() is None


def test_busy_cores_scales_the_busy_share_by_our_cores(proc_stat, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    proc_stat.extend([_stat_line(100, 0, 0, 900, 0), _stat_line(130, 0, 10, 960, 0)])
    assert threads.busy_cores() == pytest.approx(4 * 40 / 100)


def test_busy_cores_without_affinity_uses_the_cpu_count(proc_stat, monkeypatch):
    monkeypatch.delattr(threads.os, "sched_getaffinity")
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    proc_stat.extend([_stat_line(0, 0, 0, 0, 0), _stat_line(50, 0, 0, 150, 0)])
    assert threads.busy_cores() == pytest.approx(8 * 0.25)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: None)
    proc_stat.extend([_stat_line(0, 0, 0, 0, 0), _stat_line(50, 0, 0, 150, 0)])
    assert threads.busy_cores() == pytest.approx(0.25)


def test_busy_cores_is_none_without_two_readings_or_time_passing(proc_stat):
    assert threads.busy_cores() is None  # no /proc/stat
    proc_stat.append(_stat_line(1, 0, 0, 9, 0))
    assert threads.busy_cores() is None  # the second reading failed
    proc_stat.extend([_stat_line(1, 0, 0, 9, 0), _stat_line(1, 0, 0, 9, 0)])
    assert threads.busy_cores() is None  # no jiffy passed: no share to take


def test_busy_cores_sleeps_the_sample_it_is_given(proc_stat, monkeypatch):
    slept = []
    monkeypatch.setattr(threads.time, "sleep", slept.append)
    proc_stat.extend([_stat_line(0, 0, 0, 0, 0), _stat_line(1, 0, 0, 1, 0)])
    threads.busy_cores(0.03)
    threads.busy_cores()
    assert slept == [0.03, threads.SAMPLE_S] and threads.SAMPLE_S == 0.1


@pytest.mark.parametrize("cores, busy, want", [
    (4, None, 4), (4, 0.0, 4), (4, 0.49, 4), (4, 0.5, 3), (4, 1.49, 3), (4, 3.6, 1),
    (4, 40.0, 1), (1, 0.9, 1), (2, -0.7, 2),
])
def test_threads_for_leaves_the_rounded_busy_cores(cores, busy, want):
    assert threads.threads_for(cores, busy) == want


@pytest.mark.parametrize("env, want", [
    ({}, False), ({"USAE_THREADS": "auto"}, False), ({"USAE_THREADS": " AUTO "}, False),
    ({"USAE_THREADS": "all"}, True), ({"USAE_THREADS": "3"}, True),
    ({"OMP_NUM_THREADS": "2"}, True), ({"OMP_NUM_THREADS": ""}, False),
])
def test_user_set(monkeypatch, env, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("USAE_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert threads.user_set() is want


@pytest.fixture
def torch_threads(monkeypatch):
    """torch's thread count, faked: the calls to set_num_threads are recorded."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("USAE_THREADS", raising=False)
    state = {"current": 4, "set": []}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["current"])
    monkeypatch.setattr(torch, "set_num_threads", state["set"].append)
    return state


def test_a_busy_machine_gets_the_free_cores(torch_threads, monkeypatch, caplog):
    monkeypatch.setattr(threads, "busy_cores", lambda: 2.2)
    with caplog.at_level(logging.DEBUG, logger="usae.threads"):
        assert threads.choose_threads() == 2
    assert torch_threads["set"] == [2]
    assert caplog.messages == ["the machine is busy (other processes use about 2 of 4 cores): "
                               "training and extraction use 2 thread(s); set OMP_NUM_THREADS "
                               "or USAE_THREADS to choose"]


def test_two_threads_beside_a_busy_core_become_one(torch_threads, monkeypatch):
    torch_threads["current"] = 2
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.3)
    assert threads.choose_threads() == 1 and torch_threads["set"] == [1]


def test_a_quiet_machine_keeps_torchs_default(torch_threads, monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.4)
    assert threads.choose_threads() is None
    monkeypatch.setattr(threads, "busy_cores", lambda: None)
    assert threads.choose_threads() is None
    assert torch_threads["set"] == []


def test_one_thread_already_is_never_measured(torch_threads, monkeypatch):
    torch_threads["current"] = 1

    def never():
        raise AssertionError("measured")

    monkeypatch.setattr(threads, "busy_cores", never)
    assert threads.choose_threads() is None and torch_threads["set"] == []


@pytest.mark.parametrize("value, want", [("3", 3), (" 2 ", 2), ("0", 1), ("-4", 1)])
def test_usae_threads_sets_the_count(torch_threads, monkeypatch, value, want):
    monkeypatch.setattr(threads, "busy_cores", lambda: 3.9)  # not consulted
    monkeypatch.setenv("USAE_THREADS", value)
    assert threads.choose_threads() == want and torch_threads["set"] == [want]


def test_usae_threads_all_and_omp_keep_their_choice(torch_threads, monkeypatch, caplog):
    monkeypatch.setattr(threads, "busy_cores", lambda: 3.9)
    monkeypatch.setenv("USAE_THREADS", "ALL")
    with caplog.at_level(logging.WARNING, logger="usae.threads"):
        assert threads.choose_threads() is None
    assert caplog.messages == []  # "all" is a choice, not a bad value
    monkeypatch.setenv("USAE_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads() is None
    assert torch_threads["set"] == []


def test_a_bad_usae_threads_warns_and_keeps_the_default(torch_threads, monkeypatch, caplog):
    monkeypatch.setenv("USAE_THREADS", "many")
    with caplog.at_level(logging.WARNING, logger="usae.threads"):
        assert threads.choose_threads() is None
    assert caplog.messages == ["warning: USAE_THREADS='many' is not a number, 'auto' or 'all';"
                               " using torch's default"]
    assert torch_threads["set"] == []
