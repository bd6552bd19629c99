"""Activation statistics: streaming float64 sums and the standardization they give."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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

    def merge(self, other: StatsAccumulator) -> None:
        """Add another accumulator's tokens (exact: the sums simply add)."""
        self.count += other.count
        self.sum_d += other.sum_d
        self.sumsq_d += other.sumsq_d

    def result(self) -> ModelStats:
        if self.count == 0:
            raise UsaeError("cannot compute statistics over zero tokens")
        n = self.count
        mean_d = self.sum_d / n
        var_d = np.maximum(self.sumsq_d / n - mean_d ** 2, 0.0)
        mean = float(self.sum_d.sum() / (n * mean_d.size))
        var = max(float(self.sumsq_d.sum() / (n * mean_d.size)) - mean ** 2, 0.0)
        return ModelStats(mean, float(np.sqrt(var)), mean_d, np.sqrt(var_d))
