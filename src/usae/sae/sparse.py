"""The sparse training step's kernels (linear encoders, aux ``none`` or ``gao``): the same
maths as dense autograd with work proportional to the selected entries.

The encoder's TopK (and AuxK among the dead concepts) with a backward that touches only the
selected entries; sparse decodes whose dictionary gradients are sorted ``embedding_bag``s,
one sort per set of codes (``ConceptOrder``); and, while the dead concepts are few, AuxK's
gradients as GEMMs over their columns. Which of two exact ways is faster depends on the
device (``support_is_dense``, ``support_gemm_on``). Tests check every kernel against plain
autograd in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from usae.sae.objectives.topk import Selection, as_selection


def _concept_sorted(rows: Tensor, cols: Tensor, grads: Tensor, n: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The entries (rows, cols, grads) of a sparse (N, n) matrix sorted by column: (rows,
    grads) in that order and each column's start offset (n,), for one ``embedding_bag``."""
    order = torch.argsort(cols)
    counts = torch.bincount(cols, minlength=n)
    offsets = torch.zeros(n, dtype=torch.long, device=cols.device)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    return rows[order], grads[order], offsets


class ConceptOrder:
    """Sparse codes ``(values_nk, indices_nk)`` over ``n`` concepts, their entries grouped by
    concept on first use and kept: every dictionary decoded from the same codes (one per
    model) gets its weight gradient from one sort, not one sort each.

    ``weight_grad(x)`` is ``codes^T @ x``: each concept's row a weighted sum of the rows that
    selected it, one ``embedding_bag`` over all concepts: 2·nnz·d FLOPs instead of the dense
    2·N·n·d, and no (nnz, d) temporary. It is also the weight gradient of a linear encoder
    whose output gradient is nonzero only at the selected entries."""

    def __init__(self, values_nk: Tensor, indices_nk: Tensor, n: int) -> None:
        self.values_nk, self.indices_nk, self.n = values_nk.detach(), indices_nk, n
        self._sorted: tuple[Tensor, Tensor, Tensor] | None = None

    def weight_grad(self, grad_nd: Tensor) -> Tensor:
        """``codes^T @ grad_nd``: (n, d), the gradient of ``codes @ D`` w.r.t. ``D``."""
        if self._sorted is None:
            idx = self.indices_nk
            rows = torch.arange(idx.shape[0], device=idx.device)
            rows = rows.unsqueeze(1).expand_as(idx).reshape(-1)
            self._sorted = _concept_sorted(rows, idx.reshape(-1), self.values_nk.reshape(-1),
                                           self.n)
        sorted_rows, sorted_values, offsets = self._sorted
        return torch.nn.functional.embedding_bag(sorted_rows, grad_nd, offsets,
                                                 per_sample_weights=sorted_values, mode="sum")


# A weight gradient over a few columns (AuxK's: the dead concepts) is cheaper as one dense
# GEMM over those columns than as a sparse product: on a CPU the sparse product's gathers run
# about 15x slower per FLOP than BLAS (benchmarks/peers.py), so the GEMM wins while the
# columns number up to about 8 entries per row. On CUDA, embedding_bag ran about 45x slower
# per multiply-add than an fp32 GEMM (an H200, benchmarks/profile_step.py): 32 there.
DENSE_SUPPORT_RATIO = 8
CUDA_DENSE_SUPPORT_RATIO = 32
CPU = torch.device("cpu")


def support_is_dense(n_support: int, entries_per_row: int, device: torch.device = CPU) -> bool:
    """Whether entries confined to ``n_support`` columns get their weight gradient as a
    dense GEMM over those columns (rather than a sparse product) on ``device``."""
    ratio = CUDA_DENSE_SUPPORT_RATIO if device.type == "cuda" else DENSE_SUPPORT_RATIO
    return n_support <= ratio * entries_per_row


# Where AuxK's codes themselves (and their part of the encoder's input gradient) are a GEMM
# over the support's columns rather than embedding_bag: on CUDA, embedding_bag over AuxK's long
# rows (128-384 entries) ran about 10x slower than that GEMM (an H200, benchmarks/
# profile_step.py); on a CPU embedding_bag's forward is 2-4x faster than the GEMM.
SUPPORT_GEMM_DEVICES = {"cuda"}


def support_gemm_on(device: torch.device) -> bool:
    """Whether codes over a dense support (``support_is_dense``) are decoded, and send their
    input gradient, by a GEMM over the support's columns on ``device``."""
    return device.type in SUPPORT_GEMM_DEVICES


def _dense_codes(values_nk: Tensor, local_nk: Tensor, n_support: int) -> Tensor:
    """(N, n_support) codes with ``values_nk`` at columns ``local_nk`` (distinct per row)."""
    return values_nk.new_zeros(values_nk.shape[0], n_support).scatter_(1, local_nk, values_nk)


class _SparseLinearTopK(torch.autograd.Function):
    """``pre = x W^T + b``, TopK of ReLU(pre), and (optionally) AuxK among dead concepts,
    with a backward that touches only the selected entries.

    The gradient w.r.t. ``pre`` is nonzero only where a selected value is positive (ReLU), so
    the weight gradient is a sparse product, the bias gradient an ``index_add`` and the input
    gradient an ``embedding_bag``. AuxK entries send their gradient into the encoder too
    (eai-sparsify's fused encoder drops it)."""

    @staticmethod
    def forward(ctx, x_nd: Tensor, weight_nd: Tensor, bias_n: Tensor,  # type: ignore
                select: Selection, dead_concepts: Tensor | None, aux_k: int):
        # mm then an in-place bias: addmm would first copy the broadcast bias into (N, n)
        post_nc = torch.mm(x_nd, weight_nd.T).add_(bias_n).clamp_min_(0)  # ReLU in place
        values_nk, indices_nk = select(post_nc)
        empty = values_nk.new_zeros(x_nd.shape[0], 0)
        aux_v, aux_i, local = empty, empty.long(), empty.long()
        support = indices_nk.new_zeros(0) if dead_concepts is None else dead_concepts
        if support.numel():
            # AuxK looks only at the dead concepts' columns (rows stay short for the TopK)
            aux_v, local = torch.topk(post_nc.index_select(1, support),
                                      min(aux_k, support.numel()), dim=1, sorted=False)
            aux_i = support[local]
        ctx.save_for_backward(x_nd, weight_nd, values_nk, indices_nk, aux_v, aux_i, local,
                              support)
        ctx.mark_non_differentiable(indices_nk, aux_i)
        return values_nk, indices_nk, aux_v, aux_i

    @staticmethod
    def backward(ctx, g_values, _gi, g_aux, _ga):  # type: ignore[override]
        x_nd, weight_nd, values_nk, indices_nk, aux_v, aux_i, local, support = \
            ctx.saved_tensors
        n = weight_nd.shape[0]
        parts_i, parts_g = [], []  # every entry, for the input gradient
        sparse_i, sparse_g = [], []  # the entries whose weight gradient is a sparse product
        dense_aux = None  # AuxK's gradient as dense codes over the support's columns
        if g_values is not None:
            parts_i.append(indices_nk)
            parts_g.append(g_values * (values_nk > 0))
            sparse_i.append(parts_i[-1])
            sparse_g.append(parts_g[-1])
        if g_aux is not None and aux_i.shape[1]:
            parts_i.append(aux_i)
            parts_g.append(g_aux * (aux_v > 0))
            if support_is_dense(support.numel(), aux_i.shape[1], aux_i.device):
                dense_aux = _dense_codes(parts_g[-1], local, support.numel())
            else:
                sparse_i.append(aux_i)
                sparse_g.append(parts_g[-1])
        if not parts_i:
            return None, None, None, None, None, None
        grad_w = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:  # (autograd materializes g_values: sparse_i has TopK's)
            grad_w = ConceptOrder(torch.cat(sparse_g, dim=1), torch.cat(sparse_i, dim=1),
                                  n).weight_grad(x_nd)
            if dense_aux is not None:
                grad_w.index_add_(0, support, dense_aux.T @ x_nd)
        idx, grads = torch.cat(parts_i, dim=1), torch.cat(parts_g, dim=1)
        if ctx.needs_input_grad[2]:
            grad_b = grads.new_zeros(n).index_add_(0, idx.reshape(-1), grads.reshape(-1))
        if ctx.needs_input_grad[0]:
            if dense_aux is not None and support_gemm_on(x_nd.device):
                grad_x = dense_aux @ weight_nd.index_select(0, support)
                if sparse_i:  # (the TopK part alone: AuxK's went into dense_aux)
                    grad_x += torch.nn.functional.embedding_bag(
                        sparse_i[0], weight_nd, per_sample_weights=sparse_g[0], mode="sum")
            else:
                grad_x = torch.nn.functional.embedding_bag(idx, weight_nd,
                                                           per_sample_weights=grads, mode="sum")
        return grad_x, grad_w, grad_b, None, None, None


def sparse_linear_topk(x_nd: Tensor, weight_nd: Tensor, bias_n: Tensor, k: int | Selection,
                       dead_concepts: Tensor | None = None, aux_k: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values_nk, indices_nk, aux_values, aux_indices)`` of a linear encoder's sparse
    codes (and AuxK among ``dead_concepts``, sorted concept indices; empty (N, 0) when there
    are none or ``dead_concepts`` is None). ``k``: TopK's k, or the sparsity rule's selection
    ``post_nc -> (values_nk, indices_nk)`` (``UniversalSAE.select``)."""
    select = as_selection(k)
    return _SparseLinearTopK.apply(x_nd, weight_nd, bias_n, select, dead_concepts, aux_k)


class _DictionaryGrad(torch.autograd.Function):
    """Adds nothing in the forward; in the backward, the gradient of ``codes @ D`` w.r.t. the
    dictionary ``D`` for sparse codes (a ``ConceptOrder``), as one sorted ``embedding_bag``
    (the same as ``embedding_bag``'s own weight gradient, about 3x faster on CPU for large k)."""

    @staticmethod
    def forward(ctx, dict_nd: Tensor, order: ConceptOrder):  # type: ignore[override]
        ctx.order = order
        return dict_nd.new_zeros(order.indices_nk.shape[0], dict_nd.shape[1])

    @staticmethod
    def backward(ctx, grad_nd):  # type: ignore[override]
        return ctx.order.weight_grad(grad_nd), None


class _SupportDecode(torch.autograd.Function):
    """``codes @ D`` for sparse codes whose indices all fall in a few concepts ``support``
    (AuxK: the dead ones): ``embedding_bag`` forward (a GEMM over the support's rows of ``D``
    where ``support_gemm_on`` the device); both gradients are GEMMs over those rows (the
    codes' gradient would otherwise be ``embedding_bag``'s per-sample-weights backward, a loop
    several times slower)."""

    @staticmethod
    def forward(ctx, values_nk: Tensor, indices_nk: Tensor, dict_nd: Tensor,  # type: ignore
                support: Tensor):
        position = support.new_zeros(dict_nd.shape[0])  # each concept's place in support
        position[support] = torch.ones_like(support).cumsum(0) - 1  # 0.. on support's device
        local_nk = position[indices_nk]
        ctx.save_for_backward(values_nk, local_nk, dict_nd, support)
        if support_gemm_on(values_nk.device):
            return _dense_codes(values_nk, local_nk, support.numel()) @ \
                dict_nd.index_select(0, support)
        return torch.nn.functional.embedding_bag(indices_nk, dict_nd, per_sample_weights=values_nk,
                                                 mode="sum")

    @staticmethod
    def backward(ctx, grad_nd):  # type: ignore[override]
        values_nk, local_nk, dict_nd, support = ctx.saved_tensors
        grad_values = grad_dict = None
        if ctx.needs_input_grad[0]:
            grad_values = (grad_nd @ dict_nd.index_select(0, support).T).gather(1, local_nk)
        if ctx.needs_input_grad[2]:
            codes = _dense_codes(values_nk, local_nk, support.numel())
            grad_dict = grad_nd.new_zeros(dict_nd.shape)
            grad_dict.index_copy_(0, support, codes.T @ grad_nd)
        return grad_values, None, grad_dict, None


def sparse_decode_train(values_nk: Tensor, indices_nk: Tensor, dict_nd: Tensor,
                        support: Tensor | None = None, order: ConceptOrder | None = None
                        ) -> Tensor:
    """``codes @ D`` for sparse codes, for training: ``embedding_bag`` gives the forward and
    the codes' gradient; the dictionary's gradient comes from ``_DictionaryGrad``.
    ``support``: sorted distinct concepts that every index falls in (AuxK: the dead ones);
    when they are few (``support_is_dense``), both gradients are GEMMs over their rows.
    ``order``: the same codes' ``ConceptOrder``, shared by every dictionary they decode."""
    if support is not None and support_is_dense(support.numel(), indices_nk.shape[1],
                                                indices_nk.device):
        return _SupportDecode.apply(values_nk, indices_nk, dict_nd, support)
    out = torch.nn.functional.embedding_bag(indices_nk, dict_nd.detach(),
                                            per_sample_weights=values_nk, mode="sum")
    if dict_nd.requires_grad:
        order = order or ConceptOrder(values_nk, indices_nk, dict_nd.shape[0])
        out = out + _DictionaryGrad.apply(dict_nd, order)
    return out
