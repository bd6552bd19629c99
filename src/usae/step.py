"""The training step's maths, in one place: criteria, auxiliary codes and the step loss.

``step_loss`` is what the trainer differentiates. It relies on ``usae.fused`` and
``usae.sparse`` (this module's private kernels: fused autograd functions that spend GEMMs
only where a gradient is used, and the sparse step's).
The naive formulations that tests and benchmarks compare against live in ``usae.oracles``,
outside the library's import path.

Criteria share one signature, ``criterion(target, estimate) -> scalar``. The auxiliary terms
follow the reference (Kempner's ``overcomplete``): the top n/2 entries of ``relu(pre) - z``
decode a prediction of the residual ``x - x_hat``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from usae.config import RunConfig
from usae.fused import (
    multi_decode,
    normalize_rows_fused,
    paired_criterion,
    reference_aux_codes_,
    topk_reference_aux_decode,
)
from usae.sae import DICT_EPS, UniversalSAE, ball_rows, normalize_rows, sparse_decode
from usae.sparse import ConceptOrder, sparse_decode_train, sparse_linear_topk


def l1(target: Tensor, estimate: Tensor) -> Tensor:
    """The paper's criterion: mean |target - estimate|."""
    return (target - estimate).abs().mean()


def l2(target: Tensor, estimate: Tensor) -> Tensor:
    """Mean squared error."""
    return (target - estimate).square().mean()


CRITERIA = {"l1": l1, "l2": l2}


def normalize_rows_sparse_path(w_nd: Tensor) -> Tensor:
    """``normalize_rows`` for the sparse step: the same forward, a fused backward."""
    return normalize_rows_fused(w_nd, DICT_EPS)


def reference_aux_codes(post_nc: Tensor, indices_nk: Tensor) -> Tensor:
    """Dense (N, n) auxiliary codes, top n/2 of ``relu(pre) - z``, differentiable in ``post``."""
    mask = reference_aux_codes_(post_nc.detach().scatter(1, indices_nk, 0.0)) > 0
    return post_nc * mask


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



class StepOut(NamedTuple):
    """One training step's scalars: total loss and the per-decoder reconstruction terms."""

    loss: float
    source: int
    recon: list[float]
    aux: float
    l0: float


def step_loss(sae: UniversalSAE, xs: dict[str, Tensor], source: int, cfg: RunConfig,
              dead_c: Tensor | None = None) -> tuple[Tensor, StepOut, Tensor]:
    """Loss of one universal step on standardized batches ``xs`` (each (N, d_j)).

    Returns (loss, scalars, fired_c) where ``fired_c`` marks concepts that fired in the batch.
    """
    tc = cfg.train
    models = sae.models
    src = models[source]
    trainable = [tc.decoder_update == "all" or j == source for j in range(len(models))]
    sparse = tc.aux != "reference" and sae.cfg.encoder == "linear"
    norm = ball_rows if sae.cfg.dictionary_norm == "ball" else normalize_rows
    dicts = [(normalize_rows_sparse_path if sparse and norm is normalize_rows else norm)(
        sae.dictionaries[m]) if t else norm(sae.dictionaries[m].detach())
        for m, t in zip(models, trainable)]
    widths = [d.shape[1] for d in dicts]

    cat = torch.cat(dicts, dim=1) if len(dicts) > 1 else dicts[0]
    aux_all = None
    decode = sparse_decode
    aux_k = tc.aux_k or min(4 * sae.cfg.k, sae.cfg.n // 2)  # (gao's)
    if tc.aux == "reference":
        pre_nc = sae.encoders[src](xs[src])
        values_nk, indices_nk, aux_all = topk_reference_aux_decode(pre_nc, cat, sae.cfg.k,
                                                                   widths, trainable)
    elif sparse:
        # the sparse path: no dense weight gradient, no dense AuxK decode (same maths)
        lin = sae.encoders[src].linear
        # the dead concepts, found once (one host sync) for AuxK's selection and decode
        dead_s = dead_c.nonzero().squeeze(1) if tc.aux == "gao" and dead_c is not None \
            else None
        values_nk, indices_nk, aux_v, aux_i = sparse_linear_topk(
            xs[src], lin.weight, lin.bias, sae.cfg.k, dead_s, aux_k)
        # each set of codes is sorted by concept once, for every dictionary's gradient
        if aux_i.shape[1]:
            aux_order = ConceptOrder(aux_v, aux_i, sae.cfg.n)
            aux_all = torch.cat([sparse_decode_train(aux_v, aux_i, d, dead_s, aux_order)
                                 for d in dicts], dim=1)
        order = ConceptOrder(values_nk, indices_nk, sae.cfg.n)
        decode = partial(sparse_decode_train, order=order)
    else:  # normalized encoders: the norm needs the full pre-activation gradient (dense)
        pre_nc, values_nk, indices_nk = sae.encode_standardized(src, xs[src])
        if tc.aux == "gao" and dead_c is not None:
            codes = gao_aux_codes(torch.relu(pre_nc), dead_c, aux_k)
            if codes is not None:
                aux_all = multi_decode(codes, cat, widths, trainable)
    xhat_all = torch.cat([decode(values_nk, indices_nk, d) for d in dicts], dim=1)
    x_all = torch.cat([xs[m] for m in models], dim=1)
    total, recon, aux_parts = paired_criterion(
        x_all, xhat_all, aux_all, widths, tc.aux_coef,  # (read only with an aux term)
        squared=tc.criterion == "l2", detach_residual=tc.aux == "gao")
    active_nk = values_nk.detach() > 0
    l0 = active_nk.sum(1).float().mean()
    # every scalar in one transfer (one host sync, not four: on a GPU each stalls the queue)
    scalars = torch.cat([total.detach().reshape(1), recon, aux_parts.sum().reshape(1),
                         l0.reshape(1)]).tolist()  # (cat promotes l0 to total's dtype)
    return total, StepOut(scalars[0], source, scalars[1:-2], scalars[-2], scalars[-1]), \
        fired_mask(active_nk, indices_nk, sae.cfg.n)


def fired_mask(active_nk: Tensor, indices_nk: Tensor, n: int) -> Tensor:
    """(n,) bool: the concepts selected with a positive value in some row. Every active
    entry's concept is set, the inactive ones go to a spare slot: no host sync."""
    slots = torch.where(active_nk, indices_nk, n).reshape(-1)
    fired = torch.zeros(n + 1, dtype=torch.bool, device=indices_nk.device)
    return fired.index_fill_(0, slots, True)[:n]
