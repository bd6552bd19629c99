"""The training step's maths, in one place: auxiliary codes, the Matryoshka prefixes and the
step loss.

``step_loss`` is what the trainer differentiates. The sparsity rule (``UniversalSAE.select``)
and the reconstruction criterion (``usae.objectives``) are the objective's strategies; this
module runs them through ``usae.fused`` and ``usae.sparse`` (this module's private kernels:
fused autograd functions that spend GEMMs only where a gradient is used, and the sparse
step's). The naive formulations that tests and benchmarks compare against live in
``usae.oracles``, outside the library's import path.

The auxiliary terms follow the reference (Kempner's ``overcomplete``): the top n/2 entries of
``relu(pre) - z`` decode a prediction of the residual ``x - x_hat``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from usae.config import RunConfig
from usae.fused import (
    multi_decode,
    normalize_rows_fused,
    reference_aux_codes_,
    topk_reference_aux_decode,
)
from usae.objectives import criterion as make_criterion
from usae.sae import DICT_EPS, UniversalSAE, ball_rows, normalize_rows, sparse_decode
from usae.sparse import ConceptOrder, sparse_decode_train, sparse_linear_topk

# sparse codes (values_nk, indices_nk) -> one dictionary's decode (n, d) -> (N, d)
Decoder = Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]]


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


class Codes(NamedTuple):
    """The source model's sparse codes, the auxiliary prediction of the residual over every
    model (N, sum d_j) or None, and how to decode codes with each dictionary."""

    values_nk: Tensor
    indices_nk: Tensor
    aux_all: Tensor | None
    decoder: Decoder


def kernel_of(sae: UniversalSAE, cfg: RunConfig) -> str:
    """Which of the step's three exact kernels runs: ``reference`` (the paper's auxiliary
    codes, fused with the selection), ``sparse`` (linear encoders: backward only through the
    selected entries) or ``dense`` (normalized encoders need the full gradient)."""
    if cfg.train.aux == "reference":
        return "reference"
    return "sparse" if sae.cfg.encoder == "linear" else "dense"


def _dense_decoder(values_nk: Tensor, indices_nk: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda dict_nd: sparse_decode(values_nk, indices_nk, dict_nd)


def _sparse_decoder(n: int) -> Decoder:
    def decoder(values_nk: Tensor, indices_nk: Tensor) -> Callable[[Tensor], Tensor]:
        # the codes are sorted by concept once, for every dictionary's gradient
        order = ConceptOrder(values_nk, indices_nk, n)
        return lambda dict_nd: sparse_decode_train(values_nk, indices_nk, dict_nd, order=order)
    return decoder


def _codes(sae: UniversalSAE, xs: dict[str, Tensor], src: str, cfg: RunConfig, dicts: list[Tensor],
           trainable: list[bool], dead_c: Tensor | None) -> Codes:
    """The source's codes by the run's kernel (``kernel_of``), with the auxiliary decode."""
    tc, widths = cfg.train, [d.shape[1] for d in dicts]
    cat = torch.cat(dicts, dim=1) if len(dicts) > 1 else dicts[0]
    aux_k = tc.aux_k or min(4 * sae.cfg.k, sae.cfg.n // 2)  # (gao's)
    kernel = kernel_of(sae, cfg)
    if kernel == "reference":
        values_nk, indices_nk, aux_all = topk_reference_aux_decode(
            sae.pre_activations(src, xs[src]), cat, sae.select, widths, trainable)
        return Codes(values_nk, indices_nk, aux_all, _dense_decoder)
    if kernel == "sparse":
        # no dense weight gradient, no dense AuxK decode (the same maths)
        lin = sae.encoders[src].linear
        # the dead concepts, found once (one host sync) for AuxK's selection and decode
        dead_s = dead_c.nonzero().squeeze(1) if tc.aux == "gao" and dead_c is not None \
            else None
        values_nk, indices_nk, aux_v, aux_i = sparse_linear_topk(
            xs[src], lin.weight, lin.bias, sae.select, dead_s, aux_k)
        aux_all = None
        if aux_i.shape[1]:
            aux_order = ConceptOrder(aux_v, aux_i, sae.cfg.n)
            aux_all = torch.cat([sparse_decode_train(aux_v, aux_i, d, dead_s, aux_order)
                                 for d in dicts], dim=1)
        return Codes(values_nk, indices_nk, aux_all, _sparse_decoder(sae.cfg.n))
    pre_nc, values_nk, indices_nk = sae.encode_standardized(src, xs[src])
    aux_all = None
    if tc.aux == "gao" and dead_c is not None:
        codes = gao_aux_codes(torch.relu(pre_nc), dead_c, aux_k)
        if codes is not None:
            aux_all = multi_decode(codes, cat, widths, trainable)
    return Codes(values_nk, indices_nk, aux_all, _dense_decoder)


def prefix_sizes(cfg: RunConfig) -> list[int]:
    """Matryoshka's nested prefixes, the whole concept list last (``[n]`` when off)."""
    return [*cfg.train.matryoshka, cfg.sae.n]


def step_loss(sae: UniversalSAE, xs: dict[str, Tensor], source: int, cfg: RunConfig,
              dead_c: Tensor | None = None) -> tuple[Tensor, StepOut, Tensor]:
    """Loss of one universal step on standardized batches ``xs`` (each (N, d_j)).

    The source model's codes reconstruct every model; with Matryoshka prefixes the
    criterion is summed over the codes cut to each prefix (the auxiliary term and the logged
    reconstruction terms are the whole list's). Returns (loss, scalars, fired_c) where
    ``fired_c`` marks concepts that fired in the batch.
    """
    tc = cfg.train
    models = sae.models
    trainable = [tc.decoder_update == "all" or j == source for j in range(len(models))]
    norm = ball_rows if sae.cfg.dictionary_norm == "ball" else normalize_rows
    fused_norm = kernel_of(sae, cfg) == "sparse" and norm is normalize_rows
    dicts = [(normalize_rows_sparse_path if fused_norm else norm)(sae.dictionaries[m])
             if t else norm(sae.dictionaries[m].detach()) for m, t in zip(models, trainable)]
    codes = _codes(sae, xs, models[source], cfg, dicts, trainable, dead_c)
    x_all = torch.cat([xs[m] for m in models], dim=1)
    widths = [d.shape[1] for d in dicts]
    criterion = make_criterion(tc.criterion)
    total = None
    for size in prefix_sizes(cfg):
        values_nk = codes.values_nk
        if size < sae.cfg.n:
            values_nk = values_nk * (codes.indices_nk < size)
        decode = codes.decoder(values_nk, codes.indices_nk)
        xhat_all = torch.cat([decode(d) for d in dicts], dim=1)
        last = size == sae.cfg.n
        part, recon, aux_parts = criterion(
            x_all, xhat_all, codes.aux_all if last else None, widths, tc.aux_coef,
            detach_residual=tc.aux == "gao")  # (aux_coef read only with an aux term)
        total = part if total is None else total + part
    assert total is not None
    active_nk = codes.values_nk.detach() > 0
    l0 = active_nk.sum(1).float().mean()
    # every scalar in one transfer (one host sync, not four: on a GPU each stalls the queue)
    scalars = torch.cat([total.detach().reshape(1), recon, aux_parts.sum().reshape(1),
                         l0.reshape(1)]).tolist()  # (cat promotes l0 to total's dtype)
    return total, StepOut(scalars[0], source, scalars[1:-2], scalars[-2], scalars[-1]), \
        fired_mask(active_nk, codes.indices_nk, sae.cfg.n)


def fired_mask(active_nk: Tensor, indices_nk: Tensor, n: int) -> Tensor:
    """(n,) bool: the concepts selected with a positive value in some row. Every active
    entry's concept is set, the inactive ones go to a spare slot: no host sync."""
    slots = torch.where(active_nk, indices_nk, n).reshape(-1)
    fired = torch.zeros(n + 1, dtype=torch.bool, device=indices_nk.device)
    return fired.index_fill_(0, slots, True)[:n]
