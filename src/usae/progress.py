"""Progress bars that stay readable in logs: frequent on a terminal, sparse when piped."""

from __future__ import annotations

import sys
from typing import Any


def bar(**kwargs: Any):
    """A tqdm bar; when stderr is not a terminal it redraws at most every 15 s."""
    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.2 if tty else 15.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
