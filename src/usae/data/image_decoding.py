"""Images to model inputs, decoded ahead of the forward passes in threads.

``ImageDataset`` decodes image ``i`` once and resizes and crops it once per input geometry
(models that share one, like the paper's three 224 px models, share the work), as uint8;
``batch_pixels`` stacks a batch and normalizes it per model in one vectorized pass.
``decoded_batches`` runs ``ImageDataset`` in a few threads, at most two batches ahead of the
consumer. Threads, not processes: Pillow releases the GIL while it decodes and resizes, no
pixels are copied between processes (on a 2-core machine that copy and the page faults it
causes cost as much as the decoding), and memory stays bounded by three batches.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import torch
from torch import Tensor

from usae.data.backbones.base import Backbone, Preprocess
from usae.data.images import load_rgb, normalize, resize_crop_u8
from usae.errors import UsaeError

Item = tuple[int, dict[str, Tensor] | None, str | None]  # (index, uint8 pixels per model, error)


class ImageDataset:
    """Image ``i`` of ``paths`` as uint8 (3, H, W) per model; an unreadable file -> reason."""

    def __init__(self, paths: list[str], preprocess: dict[str, Preprocess], offset: int = 0
                 ) -> None:
        self.paths, self.preprocess, self.offset = paths, preprocess, offset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        try:
            img = load_rgb(self.paths[i])
            resized: dict[tuple, Tensor] = {}
            out = {}
            for m, p in self.preprocess.items():
                key = (p.crop, p.resize, p.interpolation)
                if key not in resized:
                    resized[key] = resize_crop_u8(img, p)
                out[m] = resized[key]
            return i + self.offset, out, None
        except UsaeError as err:
            return i + self.offset, None, str(err)


def batch_pixels(items: list[Item], backbones: list[Backbone]) -> dict[str, Tensor]:
    """The decoded items of one batch -> normalized (B, 3, H, W) float32 per model."""
    return {b.name: normalize(torch.stack([px[b.name] for _, px, _ in items
                                           if px is not None]).float() / 255, b.preprocess)
            for b in backbones}


def _lower_priority() -> None:
    """Decoding yields the cores to the forward passes (whose threads wait on each other)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


def decoded_batches(dataset: ImageDataset, plan: Iterable[list[int]], threads: int
                    ) -> Iterator[list[Item]]:
    """The items of each list of indices in ``plan``, in order, decoded by ``threads`` threads
    up to two batches ahead (``threads=0``: here, when asked for)."""
    if threads <= 0:
        for idx in plan:
            yield [dataset[i] for i in idx]
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="usae-decode",
                              initializer=_lower_priority)
    pending: deque[list[Future]] = deque()
    todo = iter(plan)
    try:
        for _ in range(2):
            idx = next(todo, None)
            if idx is not None:
                pending.append([pool.submit(dataset.__getitem__, i) for i in idx])
        while pending:
            futures = pending.popleft()
            idx = next(todo, None)
            if idx is not None:
                pending.append([pool.submit(dataset.__getitem__, i) for i in idx])
            yield [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
