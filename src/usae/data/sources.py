"""Data sources: what the trainer reads. One interface, several backends.

A source yields batches ``{model: x_nd}`` of raw float32 activations, where row r of every
model belongs to the same image and the same aligned token. Order is a pure function of
``(seed, epoch, batch index)``, so a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import Tensor

from usae.errors import UsaeError
from usae.store.stats import ModelStats, StatsAccumulator
from usae.store.store import Store, storage_tensor


class DataSource(Protocol):
    """What the trainer needs from a dataset of aligned activations."""

    models: tuple[str, ...]
    dims: tuple[int, ...]

    def n_images(self) -> int: ...

    def tokens_per_image(self) -> int: ...

    def stats(self) -> dict[str, ModelStats]: ...

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]: ...


def n_batches(source: DataSource, batch_images: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as a DataLoader would)."""
    return max(source.n_images() // batch_images, 0)


def shard_slice(batch_images: int, shard: tuple[int, int]) -> slice:
    """The images of a global batch that rank ``shard[0]`` of ``shard[1]`` reads (whole
    images, equal parts; the world size must divide the batch)."""
    rank, world = shard
    if batch_images % world:
        raise UsaeError(f"{world} processes cannot split a batch of {batch_images} images "
                        "evenly — use a batch_images that the world size divides")
    part = batch_images // world
    return slice(rank * part, (rank + 1) * part)


def epoch_permutation(n: int, seed: int, epoch: int, salt: int = 0) -> np.ndarray:
    """The seeded image order of one epoch."""
    return np.random.default_rng([seed, epoch, salt]).permutation(n)


def chunked_order(n: int, chunk_images: int, buffer_chunks: int, seed: int, epoch: int
                  ) -> np.ndarray:
    """An epoch's order of ``n`` images that reads mostly contiguous data: chunks of
    ``chunk_images`` consecutive images in a seeded order, then the images inside each buffer
    of ``buffer_chunks`` chunks shuffled (a shuffle buffer of ``chunk·buffer`` images)."""
    c = chunk_images
    chunks = [np.arange(s, min(s + c, n)) for s in range(0, n, c)]
    chunk_order = epoch_permutation(len(chunks), seed, epoch, salt=1)
    rng = np.random.default_rng([seed, epoch, 2])
    out = []
    for g in range(0, len(chunk_order), buffer_chunks):
        buf = np.concatenate([chunks[i] for i in chunk_order[g:g + buffer_chunks]])
        out.append(buf[rng.permutation(len(buf))])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def pairing_permutations(models: tuple[str, ...], n: int, seed: int) -> dict[str, np.ndarray]:
    """Shuffled-pairing control: model 0 keeps its order, every other model is permuted."""
    perms = {models[0]: np.arange(n)}
    for i, m in enumerate(models[1:], start=1):
        perms[m] = np.random.default_rng([seed, 7919, i]).permutation(n)
    return perms


class ArraySource:
    """Training from in-memory arrays: ``{model: (n_images, tokens, d)}`` (numpy or torch)."""

    def __init__(self, arrays: dict[str, np.ndarray | Tensor]) -> None:
        if not arrays:
            raise UsaeError("ArraySource needs at least one model")
        self.models = tuple(arrays)
        self._arrays: dict[str, np.ndarray] = {}
        shape0 = None
        for m, a in arrays.items():
            a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
            if a.ndim == 2:
                a = a[:, None, :]
            if a.ndim != 3:
                raise UsaeError(f"model {m!r}: arrays must be (n_images, tokens, d), "
                                f"got shape {a.shape}")
            if shape0 is None:
                shape0 = a.shape[:2]
            elif a.shape[:2] != shape0:
                raise UsaeError(f"model {m!r}: shape {a.shape[:2]} (images, tokens) differs from "
                                f"model {self.models[0]!r} with {shape0}")
            if not np.isfinite(a).all():
                raise UsaeError(f"model {m!r}: activations contain NaN or Inf")
            self._arrays[m] = a
        self.dims = tuple(int(self._arrays[m].shape[2]) for m in self.models)
        self._stats: dict[str, ModelStats] | None = None

    def n_images(self) -> int:
        return int(self._arrays[self.models[0]].shape[0])

    def tokens_per_image(self) -> int:
        return int(self._arrays[self.models[0]].shape[1])

    def stats(self) -> dict[str, ModelStats]:
        if self._stats is None:
            out = {}
            for m, a in self._arrays.items():
                acc = StatsAccumulator(a.shape[2])
                acc.update(a.reshape(-1, a.shape[2]))
                out[m] = acc.result()
            self._stats = out
        return self._stats

    def subset(self, image_idx: np.ndarray) -> "ArraySource":
        return ArraySource({m: a[image_idx] for m, a in self._arrays.items()})

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]:
        n = self.n_images()
        order = epoch_permutation(n, seed, epoch)
        perms = pairing_permutations(self.models, n, seed) if shuffle_pairing else None
        part = shard_slice(batch_images, shard)
        for b in range(start, n // batch_images):
            idx = order[b * batch_images:(b + 1) * batch_images]
            batch = {}
            for m, a in self._arrays.items():
                rows = perms[m][idx] if perms is not None else np.sort(idx)
                batch[m] = torch.from_numpy(
                    np.ascontiguousarray(a[rows[part]], dtype=np.float32).reshape(-1, a.shape[2]))
            yield batch


class ModelSubset:
    """The same source restricted to some of its models (for independent SAEs)."""

    def __init__(self, source: DataSource, models: tuple[str, ...]) -> None:
        unknown = [m for m in models if m not in source.models]
        if unknown:
            raise UsaeError(f"unknown model(s) {unknown}; the data has {list(source.models)}")
        self.source = source
        self.models = tuple(models)
        self.dims = tuple(source.dims[source.models.index(m)] for m in models)

    def n_images(self) -> int:
        return self.source.n_images()

    def tokens_per_image(self) -> int:
        return self.source.tokens_per_image()

    def stats(self) -> dict[str, ModelStats]:
        return {m: self.source.stats()[m] for m in self.models}

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]:
        for batch in self.source.batches(batch_images, seed, epoch, start, shuffle_pairing,
                                         shard):
            yield {m: batch[m] for m in self.models}


class StoreSource:
    """A ``DataSource`` over one split of a store, read in shuffled chunks.

    Each epoch shuffles chunks of ``chunk_images`` consecutive images, fills a buffer of
    ``buffer_chunks`` chunks with contiguous reads, shuffles images inside the buffer, and
    yields batches of whole images. Order is a pure function of (seed, epoch).
    """

    def __init__(self, store: Store | str | Path, split: str = "train", chunk_images: int = 64,
                 buffer_chunks: int = 8) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.split = split
        self._rows = self.store.rows(split)
        self.models = self.store.models
        self.dims = self.store.dims
        self.chunk_images = chunk_images
        self.buffer_chunks = buffer_chunks

    def n_images(self) -> int:
        return len(self._rows)

    def tokens_per_image(self) -> int:
        return self.store.tokens

    def stats(self) -> dict[str, ModelStats]:
        return self.store.stats()

    def image_order(self, seed: int, epoch: int) -> np.ndarray:
        """Positions into this split's rows, chunk-shuffled then buffer-shuffled."""
        return chunked_order(len(self._rows), self.chunk_images, self.buffer_chunks, seed, epoch)

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]:
        """Batches of ``batch_images`` whole images: ``{model: (B * tokens, d)}`` in the
        storage dtype (fp16/bf16/fp32; the trainer converts on its device). One gather of
        whole-image rows per model and batch, from a window of a few contiguous chunks.
        ``shard=(rank, world)``: only that rank's part of each batch is read."""
        part = shard_slice(batch_images, shard)
        order = self.image_order(seed, epoch)
        perms = (pairing_permutations(self.models, len(self._rows), seed)
                 if shuffle_pairing else None)
        span = self.chunk_images * self.buffer_chunks
        window = -1
        for b in range(start, len(order) // batch_images):
            pos = order[b * batch_images:(b + 1) * batch_images][part]
            if perms is None and (b * batch_images) // span != window:
                # this window (when starting) and the next one, read ahead while we gather
                first = window < 0
                window = (b * batch_images) // span
                lo = window * span if first else (window + 1) * span
                self.store.prefetch(self._rows[order[lo:(window + 2) * span]])
            yield {m: self._gather(m, self._rows[perms[m][pos] if perms else pos])
                   for m in self.models}

    def _gather(self, model: str, rows: np.ndarray) -> Tensor:
        """(len(rows) * tokens, d) in the storage dtype."""
        a = self.store.array(model)[rows]
        return storage_tensor(a.reshape(-1, a.shape[-1]), self.store.dtype)
