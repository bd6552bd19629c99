"""usae.data.image_decoding: each image decoded once per input geometry, batches normalized
per model, and the threaded plan giving exactly the serial one, in order."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from usae.data import image_decoding
from usae.data.backbones.base import Preprocess
from usae.data.image_decoding import ImageDataset, batch_pixels, decoded_batches
from usae.data.images import load_rgb, normalize, resize_crop_u8


@pytest.fixture
def paths(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), np.uint8)).save(p)
        out.append(str(p))
    (tmp_path / "bad.png").write_bytes(b"broken")
    out.insert(3, str(tmp_path / "bad.png"))
    return out


SMALL = Preprocess(crop=(8, 8), resize=8, interpolation="bilinear")
OTHER = Preprocess(crop=(6, 6), resize=6, interpolation="bicubic", mean=(0.1, 0.2, 0.3),
                   std=(0.5, 0.5, 0.5))


def test_an_item_is_the_offset_index_and_each_models_uint8_pixels(paths):
    data = ImageDataset(paths, {"a": SMALL, "b": OTHER, "c": SMALL}, offset=100)
    assert len(data) == 8
    i, px, err = data[2]
    assert (i, err) == (102, None) and sorted(px) == ["a", "b", "c"]
    img = load_rgb(paths[2])
    assert torch.equal(px["a"], resize_crop_u8(img, SMALL))
    assert torch.equal(px["b"], resize_crop_u8(img, OTHER))
    assert px["c"] is px["a"]  # one geometry: resized once, shared


def test_an_unreadable_image_is_its_reason(paths):
    i, px, err = ImageDataset(paths, {"a": SMALL})[3]
    assert i == 3 and px is None and err.startswith("UnidentifiedImageError: ")
    assert ImageDataset(paths, {"a": SMALL}, offset=40)[3][0] == 43


def test_geometries_differing_only_in_interpolation_are_resized_apart(paths):
    near = Preprocess(crop=(8, 8), resize=8, interpolation="nearest")
    _, px, _ = ImageDataset(paths, {"a": SMALL, "n": near})[0]
    assert px["a"] is not px["n"]
    assert torch.equal(px["n"], resize_crop_u8(load_rgb(paths[0]), near))


class _B:
    def __init__(self, name, preprocess):
        self.name, self.preprocess = name, preprocess


def test_batch_pixels_stacks_the_readable_items_and_normalizes_per_model(paths):
    data = ImageDataset(paths, {"a": SMALL, "b": OTHER})
    items = [data[i] for i in (0, 3, 5)]
    out = batch_pixels(items, [_B("a", SMALL), _B("b", OTHER)])
    assert sorted(out) == ["a", "b"] and out["a"].shape == (2, 3, 8, 8)
    assert out["b"].shape == (2, 3, 6, 6) and out["a"].dtype == torch.float32
    for row, i in enumerate((0, 5)):
        u8 = resize_crop_u8(load_rgb(paths[i]), OTHER)
        assert torch.equal(out["b"][row], normalize(u8.float() / 255, OTHER))


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_threads_give_the_serial_plan_in_order(paths, threads):
    data = ImageDataset(paths, {"a": SMALL})
    plan = [[0, 1, 2], [3], [4, 5], [6, 7], [1]]
    got = list(decoded_batches(data, plan, threads))
    assert [[i for i, _, _ in batch] for batch in got] == plan
    for batch in got:
        for i, px, err in batch:
            want = data[i]
            assert err == want[2]
            assert (px is None) == (want[1] is None)
            if px is not None:
                assert torch.equal(px["a"], want[1]["a"])


def test_an_empty_plan_or_a_short_one_ends_cleanly(paths):
    data = ImageDataset(paths, {"a": SMALL})
    assert list(decoded_batches(data, [], 2)) == []
    assert [len(b) for b in decoded_batches(data, [[0]], 2)] == [1]


def test_at_most_two_batches_are_decoded_ahead(paths, monkeypatch):
    submitted = []
    data = ImageDataset(paths, {"a": SMALL})
    real = ImageDataset.__getitem__
    lock = threading.Lock()

    def counting(self, i):
        with lock:
            submitted.append(i)
        return real(self, i)

    monkeypatch.setattr(ImageDataset, "__getitem__", counting)
    plan = [[0], [1], [2], [4], [5]]
    gen = decoded_batches(data, plan, 2)
    first = next(gen)
    assert first[0][0] == 0
    # the first batch, the one after it and the one queued when the first was taken
    time.sleep(0.3)
    assert sorted(submitted) == [0, 1, 2]
    assert [b[0][0] for b in gen] == [1, 2, 4, 5]


def test_decoding_threads_run_at_the_lowest_priority(paths):
    seen = []

    def nice_of_this_thread(i):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return i, None, None

    data = ImageDataset(paths, {"a": SMALL})
    data.__getitem__ = nice_of_this_thread  # (the pool calls the bound method it was given)
    list(decoded_batches(data, [[0, 1]], 2))
    assert seen and all(n == 19 for n in seen)


def test_lowering_priority_where_it_is_not_allowed_is_quiet(monkeypatch):
    def refused(*args):
        raise PermissionError

    monkeypatch.setattr(image_decoding.os, "setpriority", refused)
    image_decoding._lower_priority()
    monkeypatch.delattr(image_decoding.os, "setpriority")
    image_decoding._lower_priority()


@pytest.mark.parametrize("threads", [1, 2])
def test_decoding_runs_in_that_many_named_threads(paths, threads):
    names = []
    data = ImageDataset(paths, {"a": SMALL})
    real = data.__getitem__

    def named(i):
        names.append(threading.current_thread().name)
        time.sleep(0.01)
        return real(i)

    data.__getitem__ = named
    list(decoded_batches(data, [[0, 1, 2, 3], [4, 5, 6, 7]], threads))
    assert len(names) == 8 and all(n.startswith("usae-decode") for n in names)
    assert 1 <= len(set(names)) <= threads


def test_closing_the_batches_early_cancels_what_is_queued_and_waits_for_the_rest(paths):
    decoded = []
    data = ImageDataset(paths, {"a": SMALL})

    def slow(i):
        time.sleep(0.05)
        decoded.append(i)
        return i, None, None

    data.__getitem__ = slow
    gen = decoded_batches(data, [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5]], 1)
    next(gen)
    gen.close()  # the consumer stops after one batch
    at_close = len(decoded)
    time.sleep(0.3)
    assert len(decoded) == at_close  # nothing was left running
    assert at_close < 4 + 4  # the batch queued behind the next one was cancelled
