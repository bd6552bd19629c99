"""The training step's maths, in one place: auxiliary codes, the Matryoshka prefixes and the
step loss.

``step_loss`` is what the trainer differentiates. The sparsity rule (``UniversalSAE.select``)
and the reconstruction criterion (``usae.sae.objectives``) are the objective's strategies; this
module runs them through ``usae.sae.fused`` and ``usae.sae.sparse`` (this module's private kernels:
fused autograd functions that spend GEMMs only where a gradient is used, and the sparse
step's). The naive formulations that tests and benchmarks compare against live in
``usae.sae.oracles``, outside the library's import path.

The auxiliary terms follow the reference (Kempner's ``overcomplete``): the top n/2 entries of
``relu(pre) - z`` decode a prediction of the residual ``x - x_hat``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from usae.config import RunConfig
from usae.sae.fused import (
    multi_decode,
    normalize_rows_fused,
    reference_aux_codes_,
    topk_reference_aux_decode,
)
from usae.sae.model import (
    DICT_EPS,
    UniversalSAE,
    ball_rows,
    densify,
    normalize_rows,
    sparse_decode,
)
from usae.sae.objectives import criterion as make_criterion
from usae.sae.objectives.topk import Selection
from usae.sae.sparse import ConceptOrder, sparse_decode_train, sparse_linear_topk

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


def _codes(sae: UniversalSAE, x_nd: Tensor, src: str, cfg: RunConfig, dicts: list[Tensor],
           trainable: list[bool], dead_c: Tensor | None, select: Selection,
           pre_nc: Tensor | None = None) -> Codes:
    """Model ``src``'s codes of its standardized activations ``x_nd`` by the run's kernel
    (``kernel_of``) and the selection ``select``, with the auxiliary decode into ``dicts``.
    ``pre_nc``: its pre-activations when already computed (the dense kernels)."""
    tc, widths = cfg.train, [d.shape[1] for d in dicts]
    cat = torch.cat(dicts, dim=1) if len(dicts) > 1 else dicts[0]
    aux_k = tc.aux_k or min(4 * sae.cfg.k, sae.cfg.n // 2)  # (gao's)
    kernel = kernel_of(sae, cfg)
    if kernel == "sparse":
        # no dense weight gradient, no dense AuxK decode (the same maths)
        lin = sae.linear(src)
        # the dead concepts, found once (one host sync) for AuxK's selection and decode
        dead_s = dead_c.nonzero().squeeze(1) if tc.aux == "gao" and dead_c is not None \
            else None
        values_nk, indices_nk, aux_v, aux_i = sparse_linear_topk(
            x_nd, lin.weight, lin.bias, select, dead_s, aux_k)
        aux_all = None
        if aux_i.shape[1]:
            aux_order = ConceptOrder(aux_v, aux_i, sae.cfg.n)
            aux_all = torch.cat([sparse_decode_train(aux_v, aux_i, d, dead_s, aux_order)
                                 for d in dicts], dim=1)
        return Codes(values_nk, indices_nk, aux_all, _sparse_decoder(sae.cfg.n))
    pre_nc = sae.pre_activations(src, x_nd) if pre_nc is None else pre_nc
    if kernel == "reference":
        values_nk, indices_nk, aux_all = topk_reference_aux_decode(pre_nc, cat, select, widths,
                                                                   trainable)
        return Codes(values_nk, indices_nk, aux_all, _dense_decoder)
    values_nk, indices_nk = select(torch.relu(pre_nc))
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

    ``active_set=source`` (the paper): the sampled source model's codes reconstruct every
    model. ``global``: see ``_global_step_loss``. With Matryoshka prefixes the criterion is
    summed over the codes cut to each prefix (the auxiliary term and the logged terms are the
    whole list's). Returns (loss, scalars, fired_c) where ``fired_c`` marks concepts that
    fired in the batch.
    """
    tc = cfg.train
    models = sae.models
    trainable = [(tc.decoder_update == "all" or j == source) and m not in tc.frozen_models
                 for j, m in enumerate(models)]
    dicts = _dictionaries(sae, cfg, trainable)
    if tc.active_set == "global":
        return _global_step_loss(sae, xs, source, cfg, dicts, dead_c)
    codes = _codes(sae, xs[models[source]], models[source], cfg, dicts, trainable, dead_c,
                   sae.select)
    x_all = torch.cat([xs[m] for m in models], dim=1)
    total, recon, aux_parts = _reconstruction([codes] * len(models), dicts, x_all,
                                              codes.aux_all, sae.cfg.n, cfg)
    if tc.match_coef and models[source] not in tc.frozen_models:
        total = total + tc.match_coef * code_matching(sae, xs, codes, tc.frozen_models)
    return _finish(total, recon, aux_parts, [codes], source, sae.cfg.n)


def code_matching(sae: UniversalSAE, xs: dict[str, Tensor], codes: Codes,
                  frozen: tuple[str, ...]) -> Tensor:
    """Mean squared distance between the source's dense codes (N, n) and the mean of the
    frozen models' codes on the same tokens (no gradient into those): what pulls a model
    added by ``--extend`` towards the concepts the run already has (``match_coef``)."""
    n = sae.cfg.n
    with torch.no_grad():
        target = torch.stack([densify(*sae.encode_standardized(m, xs[m])[1:], n)
                              for m in frozen]).mean(0)
    return (densify(codes.values_nk, codes.indices_nk, n) - target).square().mean()


def _dictionaries(sae: UniversalSAE, cfg: RunConfig, trainable: list[bool]) -> list[Tensor]:
    """Every model's normalized dictionary (n, d_j), detached where it does not step."""
    norm = ball_rows if sae.cfg.dictionary_norm == "ball" else normalize_rows
    fused_norm = kernel_of(sae, cfg) == "sparse" and norm is normalize_rows
    return [(normalize_rows_sparse_path if fused_norm else norm)(sae.dictionaries[m])
            if t else norm(sae.dictionaries[m].detach()) for m, t in zip(sae.models, trainable)]


def _reconstruction(block_codes: list[Codes], dicts: list[Tensor], x_all: Tensor,
                    aux_all: Tensor | None, n: int, cfg: RunConfig
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The criterion on ``x_all`` (N, sum d_j) against model j's block decoded from
    ``block_codes[j]`` with ``dicts[j]``, summed over the Matryoshka prefixes (codes cut to
    the concepts below each size; the auxiliary term only with the whole list)."""
    tc = cfg.train
    criterion = make_criterion(tc.criterion)
    widths = [d.shape[1] for d in dicts]
    total = None
    for size in prefix_sizes(cfg):
        decoders: dict[int, Callable[[Tensor], Tensor]] = {}  # one per codes (shared sort)
        for c in block_codes:
            if id(c) not in decoders:
                values_nk = c.values_nk if size == n else c.values_nk * (c.indices_nk < size)
                decoders[id(c)] = c.decoder(values_nk, c.indices_nk)
        xhat_all = torch.cat([decoders[id(c)](d) for c, d in zip(block_codes, dicts)], dim=1)
        part, recon, aux_parts = criterion(
            x_all, xhat_all, aux_all if size == n else None, widths, tc.aux_coef,
            detach_residual=tc.aux == "gao")  # (aux_coef read only with an aux term)
        total = part if total is None else total + part
    assert total is not None
    return total, recon, aux_parts


def _finish(total: Tensor, recon: Tensor, aux_parts: Tensor, codes: list[Codes], source: int,
            n: int) -> tuple[Tensor, StepOut, Tensor]:
    """The step's result: the loss, its scalars in one host transfer, the fired concepts
    (over every set of codes); ``l0`` is the mean over the sets of codes."""
    actives = [c.values_nk.detach() > 0 for c in codes]
    l0 = torch.stack([a.sum(1).float().mean() for a in actives]).mean()
    fired = fired_mask(actives[0], codes[0].indices_nk, n)
    for a, c in zip(actives[1:], codes[1:]):
        fired |= fired_mask(a, c.indices_nk, n)
    # every scalar in one transfer (one host sync, not four: on a GPU each stalls the queue)
    scalars = torch.cat([total.detach().reshape(1), recon, aux_parts.sum().reshape(1),
                         l0.reshape(1)]).tolist()  # (cat promotes l0 to total's dtype)
    return total, StepOut(scalars[0], source, scalars[1:-2], scalars[-2], scalars[-1]), fired


def _global_step_loss(sae: UniversalSAE, xs: dict[str, Tensor], source: int, cfg: RunConfig,
                      dicts: list[Tensor], dead_c: Tensor | None
                      ) -> tuple[Tensor, StepOut, Tensor]:
    """``active_set=global`` (SPARC's global TopK): every model encodes its own activations;
    the sparsity rule picks one active set per token from the models' ReLU'd
    pre-activations averaged (total evidence for a concept; a model's negative value does not
    veto the others, as its own code would zero it anyway); each model's code is its own
    values on that set and reconstructs its own model, plus ``cross_coef`` x every other
    model (``cross_coef=0``: self only)."""
    models, n, tc = sae.models, sae.cfg.n, cfg.train
    dense = kernel_of(sae, cfg) != "sparse"
    pres = {m: sae.pre_activations(m, xs[m]) for m in models} if dense else {}
    with torch.no_grad():
        posts = [torch.relu(pres[m].detach() if dense else sae.pre_activations(m, xs[m]))
                 for m in models]
        shared_v, shared_i = sae.select(torch.stack(posts).mean(0))
        on_nk = shared_v > 0  # (a rule's zero padding stays off in every model)

    def fixed(post_nc: Tensor) -> tuple[Tensor, Tensor]:
        return post_nc.gather(1, shared_i) * on_nk, shared_i

    codes = [_codes(sae, xs[m], m, cfg, [d], [True], dead_c, fixed, pres.get(m))
             for m, d in zip(models, dicts)]
    x_all = torch.cat([xs[m] for m in models], dim=1)
    auxes = [c.aux_all for c in codes]
    aux_all = None if any(a is None for a in auxes) else torch.cat(auxes, dim=1)  # type: ignore
    total, recon, aux_parts = _reconstruction(codes, dicts, x_all, aux_all, n, cfg)
    if tc.cross_coef > 0:
        criterion = make_criterion(tc.criterion)
        for i, c in enumerate(codes):
            decode = c.decoder(c.values_nk, c.indices_nk)
            rest = [j for j in range(len(models)) if j != i]
            cross, _, _ = criterion(torch.cat([xs[models[j]] for j in rest], dim=1),
                                    torch.cat([decode(dicts[j]) for j in rest], dim=1), None,
                                    [dicts[j].shape[1] for j in rest], 0.0, False)
            total = total + tc.cross_coef * cross
    return _finish(total, recon, aux_parts, codes, source, n)


def fired_mask(active_nk: Tensor, indices_nk: Tensor, n: int) -> Tensor:
    """(n,) bool: the concepts selected with a positive value in some row. Every active
    entry's concept is set, the inactive ones go to a spare slot: no host sync."""
    slots = torch.where(active_nk, indices_nk, n).reshape(-1)
    fired = torch.zeros(n + 1, dtype=torch.bool, device=indices_nk.device)
    return fired.index_fill_(0, slots, True)[:n]
