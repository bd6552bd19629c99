"""Data sources: what the trainer reads. One interface, several backends.

A source yields batches ``{model: x_nd}`` of raw float32 activations, where row r of every
model belongs to the same image and the same aligned token. Order is a pure function of
``(seed, epoch, batch index)``, so a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import Tensor

from usae.errors import UsaeError


@dataclass(frozen=True)
class ModelStats:
    """Per-model activation statistics over all tokens (float64 accumulations)."""

    mean: float
    std: float
    mean_d: np.ndarray
    std_d: np.ndarray

    def for_mode(self, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean_d, std_d) to standardize with, for a ``SAEConfig.standardize`` mode."""
        d = self.mean_d.shape[0]
        if mode == "scalar":
            return np.full(d, self.mean), np.full(d, self.std)
        if mode == "per_dim":
            return self.mean_d, self.std_d
        if mode == "center_per_dim":
            return self.mean_d, np.full(d, float(np.sqrt(np.mean(self.std_d ** 2))))
        raise UsaeError(f"unknown standardize mode {mode!r}")

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "mean_d": self.mean_d.tolist(),
                "std_d": self.std_d.tolist()}

    @classmethod
    def from_json(cls, obj: dict) -> "ModelStats":
        return cls(float(obj["mean"]), float(obj["std"]), np.asarray(obj["mean_d"], np.float64),
                   np.asarray(obj["std_d"], np.float64))


class StatsAccumulator:
    """Streaming sum / sum of squares in float64, per dimension."""

    def __init__(self, d: int) -> None:
        self.count = 0
        self.sum_d = np.zeros(d, np.float64)
        self.sumsq_d = np.zeros(d, np.float64)

    def update(self, x_nd: np.ndarray | Tensor) -> None:
        x = np.asarray(x_nd, dtype=np.float64).reshape(-1, self.sum_d.shape[0])
        self.count += x.shape[0]
        self.sum_d += x.sum(0)
        self.sumsq_d += np.square(x).sum(0)

    def result(self) -> ModelStats:
        if self.count == 0:
            raise UsaeError("cannot compute statistics over zero tokens")
        n = self.count
        mean_d = self.sum_d / n
        var_d = np.maximum(self.sumsq_d / n - mean_d ** 2, 0.0)
        mean = float(self.sum_d.sum() / (n * mean_d.size))
        var = max(float(self.sumsq_d.sum() / (n * mean_d.size)) - mean ** 2, 0.0)
        return ModelStats(mean, float(np.sqrt(var)), mean_d, np.sqrt(var_d))


class DataSource(Protocol):
    """What the trainer needs from a dataset of aligned activations."""

    models: tuple[str, ...]
    dims: tuple[int, ...]

    def n_images(self) -> int: ...

    def tokens_per_image(self) -> int: ...

    def stats(self) -> dict[str, ModelStats]: ...

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False) -> Iterator[dict[str, Tensor]]: ...


def n_batches(source: DataSource, batch_images: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as a DataLoader would)."""
    return max(source.n_images() // batch_images, 0)


def epoch_permutation(n: int, seed: int, epoch: int, salt: int = 0) -> np.ndarray:
    """The seeded image order of one epoch."""
    return np.random.default_rng([seed, epoch, salt]).permutation(n)


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
                                f"{self.models[0]!r}'s {shape0}")
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
                shuffle_pairing: bool = False) -> Iterator[dict[str, Tensor]]:
        n = self.n_images()
        order = epoch_permutation(n, seed, epoch)
        perms = pairing_permutations(self.models, n, seed) if shuffle_pairing else None
        for b in range(start, n // batch_images):
            idx = order[b * batch_images:(b + 1) * batch_images]
            batch = {}
            for m, a in self._arrays.items():
                rows = perms[m][idx] if perms is not None else idx
                batch[m] = torch.from_numpy(
                    np.ascontiguousarray(a[np.sort(rows) if perms is None else rows],
                                         dtype=np.float32).reshape(-1, a.shape[2]))
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
                shuffle_pairing: bool = False) -> Iterator[dict[str, Tensor]]:
        for batch in self.source.batches(batch_images, seed, epoch, start, shuffle_pairing):
            yield {m: batch[m] for m in self.models}
