"""Reconstruction criteria and auxiliary losses.

Every criterion has the signature ``criterion(target, estimate) -> scalar``. The auxiliary
terms follow the reference (Kempner's ``overcomplete``): the top n/2 entries of
``relu(pre) - z`` decode a prediction of the residual ``x - x_hat``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l1(target: Tensor, estimate: Tensor) -> Tensor:
    """The paper's criterion: mean |target - estimate|."""
    return (target - estimate).abs().mean()


def l2(target: Tensor, estimate: Tensor) -> Tensor:
    """Mean squared error."""
    return (target - estimate).square().mean()


CRITERIA = {"l1": l1, "l2": l2}


def reference_aux_codes_(rest_nc: Tensor) -> Tensor:
    """In place: keep the top n/2 entries per row of ``rest_nc = relu(pre) - z`` (>= 0).

    Equal, as a set, to the reference's ``topk(relu(pre) - z, n // 2)`` wherever it matters:
    entries equal to zero decode to nothing and get zero gradient, so ties among zeros are
    irrelevant. Rows with more than n/2 positive entries are cut at their (n/2)-th largest
    value, found by partial selection (``kthvalue``), only on the rows that need it.
    """
    n = rest_nc.shape[1]
    half = n // 2
    over = (rest_nc > 0).sum(dim=1, dtype=torch.int32) > half
    if bool(over.any()):
        rows = over.nonzero().squeeze(1)
        sub = rest_nc.index_select(0, rows)
        # the half-th largest value = the (n - half + 1)-th smallest
        thr = torch.kthvalue(sub, n - half + 1, dim=1).values
        sub.masked_fill_(sub < thr.unsqueeze(1), 0.0)
        rest_nc.index_copy_(0, rows, sub)
    return rest_nc


def reference_aux_codes(post_nc: Tensor, indices_nk: Tensor) -> Tensor:
    """Dense (N, n) auxiliary codes, top n/2 of ``relu(pre) - z``, differentiable in ``post``."""
    mask = reference_aux_codes_(post_nc.detach().scatter(1, indices_nk, 0.0)) > 0
    return post_nc * mask


def naive_reference_aux_codes(pre_nc: Tensor, codes_nc: Tensor) -> Tensor:
    """The reference's formulation, kept for tests and benchmarks: a full top-n/2 sort."""
    rest = torch.relu(pre_nc) - codes_nc
    top = torch.topk(rest, k=rest.shape[1] // 2, dim=1)
    return torch.zeros_like(rest).scatter(1, top.indices, top.values)


def gao_aux_codes(post_nc: Tensor, dead_c: Tensor, aux_k: int) -> Tensor | None:
    """AuxK (Gao et al. 2024): the top ``aux_k`` pre-activations among dead latents.

    Returns dense (N, n) codes, or None when no latent is dead.
    """
    if not bool(dead_c.any()):
        return None
    masked = post_nc.masked_fill(~dead_c.unsqueeze(0), 0.0)
    k = min(aux_k, int(dead_c.sum()))
    vals, idx = torch.topk(masked, k, dim=1, sorted=False)
    return torch.zeros_like(post_nc).scatter(1, idx, vals)

