"""usae.data.splits: given split names win; otherwise a seeded held-out fraction, counted
here by hand."""

from __future__ import annotations

import numpy as np
import pytest

from usae.data.splits import SPLIT_NAMES, assign_splits


def _entries(n):
    return [{"path": f"{i}.jpg"} for i in range(n)]


def test_given_splits_are_kept_and_gaps_are_train():
    entries = _entries(4)
    assign_splits(entries, ["val", None, "test", ""], seed=0)
    assert [e["split"] for e in entries] == ["val", "train", "test", "train"]


@pytest.mark.parametrize("n, fraction, n_val", [
    (10, 0.1, 1), (100, 0.1, 10), (20, 0.25, 5), (7, 0.5, 4), (5, 0.1, 0), (15, 0.1, 2),
    (1, 0.9, 0), (0, 0.1, 0), (3, 0.0, 0), (4, 1.0, 4), (2, 0.5, 1),
])
def test_a_rounded_fraction_is_held_out(n, fraction, n_val):
    entries = _entries(n)
    assign_splits(entries, [None] * n, seed=3, val_fraction=fraction)
    splits = [e["split"] for e in entries]
    assert splits.count("val") == n_val and splits.count("train") == n - n_val


def test_the_held_out_images_are_a_seeded_permutations_first():
    entries = _entries(30)
    assign_splits(entries, [None] * 30, seed=7)
    held = {i for i, e in enumerate(entries) if e["split"] == "val"}
    assert held == set(np.random.default_rng([7, 104729]).permutation(30)[:3].tolist())
    again = _entries(30)
    assign_splits(again, [None] * 30, seed=7)
    assert again == entries
    other = _entries(30)
    assign_splits(other, [None] * 30, seed=8)
    assert other != entries


def test_the_default_fraction_is_a_tenth():
    entries = _entries(50)
    assign_splits(entries, [None] * 50, seed=0)
    assert [e["split"] for e in entries].count("val") == 5


def test_split_names():
    assert SPLIT_NAMES == {"train", "val", "validation", "test"}
