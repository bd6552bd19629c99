"""Keep freed memory in the process for reuse (glibc only).

A CPU training step allocates and frees several (N, n) temporaries (150 MB each at paper
dims). glibc serves blocks that large with fresh ``mmap`` calls and unmaps them on free, so
every step page-faults gigabytes back in. Serving them from the heap and never trimming it
removes those faults: about 10% of a paper-dims step on a 2-core CPU (benchmarks/RESULTS.md).
The cost: memory freed by the process is not returned to the OS until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}


def _mallopt(settings: dict[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(key, value) == 1 for key, value in settings.items())
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def keep_freed_memory(device: object = "cpu") -> bool:
    """Switch glibc to heap-only, untrimmed allocation for work on ``device``; True when it
    took effect. A CUDA device allocates through its own caching allocator: nothing to do."""
    if str(device).startswith("cuda"):
        return False
    ok = _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2 ** 30})
    log.debug("glibc malloc: heap-only, untrimmed (%s)", "on" if ok else "unavailable")
    return ok


def default_malloc() -> bool:
    """Back to glibc's defaults (large blocks mmapped, heap trimmed): how a plain script runs."""
    return _mallopt(GLIBC_DEFAULTS)
