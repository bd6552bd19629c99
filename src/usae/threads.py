"""How many intra-op threads a command's CPU work uses on a machine that others share.

torch starts one thread per core. When another process keeps cores busy, its threads wait
on each other at every parallel region, and a small training step ran 3x slower on two
threads than on one (``benchmarks/threads.py``; docs/RESULTS.md). So at a command's start
usae measures the cores other processes keep busy (``/proc/stat``, sampled over 0.1 s,
before any work of its own) and uses only the cores left, at least one.

``OMP_NUM_THREADS`` (or ``USAE_THREADS=N``) chooses the count instead; ``USAE_THREADS=all``
keeps torch's default.

CPU results can differ in their last bits between thread counts, so what must be bit-identical
keeps one count: a training run records its count in the checkpoint and ``--resume`` uses it
again, and ``usae cache`` (whose re-run after a kill must equal an uninterrupted store) keeps
torch's default.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
SAMPLE_S = 0.1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """Cores kept busy by every process over the next ``sample_s`` seconds, or None."""
    first = _cpu_times()
    time.sleep(sample_s)
    second = _cpu_times()
    if first is None or second is None or second[1] <= first[1]:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return cores * (second[0] - first[0]) / (second[1] - first[1])


def threads_for(cores: int, busy: float | None) -> int:
    """Threads for our work: the cores others leave free (rounded), at least one."""
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(busy + 0.5)))


def user_set() -> bool:
    """True when the user chose the thread count (``OMP_NUM_THREADS`` or ``USAE_THREADS``)."""
    return bool(os.environ.get("OMP_NUM_THREADS")) or \
        os.environ.get("USAE_THREADS", "auto").strip().lower() != "auto"


def choose_threads() -> int | None:
    """Set torch's intra-op threads for this command (see the module's docstring); returns
    the count set, or None when the user or the default decides."""
    wanted = os.environ.get("USAE_THREADS", "auto").strip().lower()
    if os.environ.get("OMP_NUM_THREADS") or wanted == "all":
        return None
    import torch

    if wanted != "auto":
        try:
            n = max(1, int(wanted))
        except ValueError:
            log.warning("warning: USAE_THREADS=%r is not a number, 'auto' or 'all'; using "
                        "torch's default", wanted)
            return None
    else:
        current = torch.get_num_threads()
        if current <= 1:
            return None
        n = threads_for(current, busy_cores())
        if n >= current:
            return None
        log.debug("the machine is busy (other processes use about %d of %d cores): training "
                 "and extraction use %d thread(s); set OMP_NUM_THREADS or USAE_THREADS to "
                 "choose", current - n, current, n)
    torch.set_num_threads(n)
    return n
