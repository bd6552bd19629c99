"""Streaming metrics over aligned tokens: the cross-model R² matrix and friends.

Everything accumulates sums in float64 so a split of any size is evaluated in one pass with
bounded memory, and the result equals the whole-split formula, not an average of batches.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from usae.sae.model import UniversalSAE, sparse_decode


class R2Accumulator:
    """Accumulates, for every (encoder i, decoder j), the squared error in model j's raw space.

    ``r2()``: R² with per-dimension means over the evaluated tokens.
    ``r2_paper()``: the paper's ``1 - mean((x-x̂)²) / mean((x-mean(x))²)`` with a scalar mean.
    """

    def __init__(self, models: tuple[str, ...], dims: tuple[int, ...]) -> None:
        self.models, self.dims = models, dims
        m = len(models)
        self.sse = np.zeros((m, m), np.float64)
        self.count = 0
        self.sum_d = [np.zeros(d, np.float64) for d in dims]
        self.sumsq_d = [np.zeros(d, np.float64) for d in dims]

    def update_targets(self, raw: dict[str, Tensor]) -> None:
        for j, m in enumerate(self.models):
            x = raw[m].double()
            self.sum_d[j] += x.sum(0).cpu().numpy()
            self.sumsq_d[j] += x.square().sum(0).cpu().numpy()
        self.count += raw[self.models[0]].shape[0]

    def update_error(self, i: int, j: int, x_nd: Tensor, xhat_nd: Tensor) -> None:
        self.sse[i, j] += float((x_nd.double() - xhat_nd.double()).square().sum())

    def _sst(self, scalar: bool) -> np.ndarray:
        out = np.zeros(len(self.models))
        n = max(self.count, 1)
        for j in range(len(self.models)):
            if scalar:
                mean = self.sum_d[j].sum() / (n * self.dims[j])
                out[j] = self.sumsq_d[j].sum() - n * self.dims[j] * mean ** 2
            else:
                out[j] = (self.sumsq_d[j] - self.sum_d[j] ** 2 / n).sum()
        return np.maximum(out, 1e-30)

    def r2(self) -> np.ndarray:
        return 1.0 - self.sse / self._sst(scalar=False)[None, :]

    def r2_paper(self) -> np.ndarray:
        return 1.0 - self.sse / self._sst(scalar=True)[None, :]

    def mse(self) -> np.ndarray:
        """(M, M) mean squared error per element in raw space."""
        return self.sse / (max(self.count, 1) * np.asarray(self.dims, np.float64)[None, :])


def cross_model_update(acc: R2Accumulator, sae: UniversalSAE, raw: dict[str, Tensor],
                       dicts: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Encode every model's raw batch ``(N, d_m)``, decode the codes into every model's raw
    space, and add the errors to ``acc``. Returns each model's sparse codes
    ``(values_nk, indices_nk)``. ``dicts``: each model's normalized dictionary (n, d_m)."""
    acc.update_targets(raw)
    codes = {}
    for i, mi in enumerate(sae.models):
        enc = sae.encode_standardized(mi, sae.standardize(mi, raw[mi]))
        codes[mi] = (enc.values_nk, enc.indices_nk)
        for j, mj in enumerate(sae.models):
            xhat = sae.unstandardize(mj, sparse_decode(enc.values_nk, enc.indices_nk, dicts[mj]))
            acc.update_error(i, j, raw[mj], xhat)
    return codes


@torch.no_grad()
def r2_matrix(sae: UniversalSAE, batches: Iterable[dict[str, Tensor]]) -> R2Accumulator:
    """Cross-model reconstruction over raw batches (eval mode; BatchNorm uses running stats)."""
    was_training = sae.training
    sae.eval()
    acc = R2Accumulator(sae.models, sae.cfg.dims)
    device = sae.device_of()
    dicts = {m: sae.normalized_dict(m) for m in sae.models}
    try:
        for raw in batches:
            cross_model_update(acc, sae, {m: raw[m].to(device, torch.float32)
                                          for m in sae.models}, dicts)
    finally:
        sae.train(was_training)
    return acc


class JaccardAccumulator:
    """Mean Jaccard index of the active sets (concepts with a positive code) of every pair of
    models on the same tokens (SPARC's measure of a shared code): row i, column j averages
    ``|A_i ∩ A_j| / |A_i ∪ A_j|`` over the tokens where either set is non-empty."""

    def __init__(self, models: tuple[str, ...]) -> None:
        m = len(models)
        self.models = models
        self.sums = torch.zeros(m, m, dtype=torch.float64)
        self.counts = torch.zeros(m, m, dtype=torch.float64)

    def update(self, codes: dict[str, tuple[Tensor, Tensor]]) -> None:
        """``codes[m] = (values_nk, indices_nk)`` for the same N tokens in every model."""
        sets = [(codes[m][1].cpu(), codes[m][0].cpu() > 0) for m in self.models]
        for i, (idx_i, act_i) in enumerate(sets):
            for j in range(i, len(sets)):
                idx_j, act_j = sets[j]
                same = (idx_i[:, :, None] == idx_j[:, None, :]) & act_i[:, :, None] & \
                    act_j[:, None, :]  # (N, k, k): a concept active in both
                inter = same.sum((1, 2)).double()
                union = act_i.sum(1).double() + act_j.sum(1).double() - inter
                used = union > 0
                value = float((inter[used] / union[used]).sum())
                for a, b in {(i, j), (j, i)}:
                    self.sums[a, b] += value
                    self.counts[a, b] += float(used.sum())

    def result(self) -> list[list[float | None]]:
        """The M×M matrix, rounded; None where no token had an active concept."""
        out = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1),
                          torch.full_like(self.sums, float("nan")))
        return [[None if v != v else round(float(v), 5) for v in row] for row in out]
