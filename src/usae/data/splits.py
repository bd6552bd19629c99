"""Train/held-out splits of an image list: given names, or a seeded held-out fraction."""

from __future__ import annotations

from typing import Any

import numpy as np

SPLIT_NAMES = {"train", "val", "validation", "test"}


def assign_splits(entries: list[dict[str, Any]], given: list[str | None], seed: int,
                  val_fraction: float = 0.1) -> None:
    """Use the given splits; when none are given, hold out a seeded ``val_fraction``."""
    if any(s is not None for s in given):
        for e, s in zip(entries, given):
            e["split"] = s or "train"
        return
    n = len(entries)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    val = set(np.random.default_rng([seed, 104729]).permutation(n)[:n_val].tolist())
    for i, e in enumerate(entries):
        e["split"] = "val" if i in val else "train"
