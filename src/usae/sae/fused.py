"""Fused autograd functions for the training step: the same maths in fewer passes.

On a CPU the step is bound by two things: GEMM FLOPs and passes over (N, n) temporaries.
These functions spend GEMMs only where a gradient will be used and touch each (N, n) buffer
as few times as possible. Tests check them against plain autograd. The sparse step's kernels
(linear encoders with aux none or gao) are in ``usae.sae.sparse``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from usae.sae.objectives.topk import Selection, as_selection


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


def _weight_grad(a_nc: Tensor, grad_out: Tensor, cat: Tensor, widths: list[int],
                 trainable: list[bool]) -> Tensor:
    """Gradient of ``a @ cat`` w.r.t. ``cat``: GEMMs only for trainable column blocks."""
    if all(trainable):
        return a_nc.T @ grad_out
    grad_cat = torch.zeros_like(cat)  # frozen dictionaries' columns: zeros, no GEMM
    start = 0
    for w, needed in zip(widths, trainable):
        if needed:
            torch.mm(a_nc.T, grad_out[:, start:start + w], out=grad_cat[:, start:start + w])
        start += w
    return grad_cat


class _NormalizeRows(torch.autograd.Function):
    """``w / (||w_row|| + eps)`` with the same forward as autograd's (the same division) and
    a backward of three passes over ``w`` instead of autograd's eight:
    ``g / s - w * (g . w) / (s^2 ||w||)`` per row, ``s = ||w|| + eps`` (the second term is 0
    for a zero row)."""

    @staticmethod
    def forward(ctx, w_nd: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm = w_nd.norm(dim=1, keepdim=True)
        s = norm + eps
        ctx.save_for_backward(w_nd, norm, s)
        return w_nd / s

    @staticmethod
    def backward(ctx, grad_nd):  # type: ignore[override]
        w_nd, norm, s = ctx.saved_tensors
        dot = torch.linalg.vecdot(grad_nd, w_nd, dim=1).unsqueeze(1)  # 0 for a zero row
        coef = dot / (s * s * norm.clamp_min(1e-30))
        return torch.addcmul(grad_nd / s, w_nd, coef, value=-1.0), None


def normalize_rows_fused(w_nd: Tensor, eps: float) -> Tensor:
    """``w / (||w_row|| + eps)``: autograd's forward bit for bit, a cheaper backward."""
    return _NormalizeRows.apply(w_nd, eps)


class _MultiDecode(torch.autograd.Function):
    """``a @ cat`` where ``cat = [D_1 | ... | D_M]``: one GEMM for all models."""

    @staticmethod
    def forward(ctx, a_nc: Tensor, cat: Tensor, widths: list[int],  # type: ignore[override]
                trainable: list[bool]) -> Tensor:
        ctx.save_for_backward(a_nc, cat)
        ctx.widths, ctx.trainable = widths, trainable
        return a_nc @ cat

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        a_nc, cat = ctx.saved_tensors
        grad_a = grad_out @ cat.T if ctx.needs_input_grad[0] else None
        grad_cat = (_weight_grad(a_nc, grad_out, cat, ctx.widths, ctx.trainable)
                    if ctx.needs_input_grad[1] else None)
        return grad_a, grad_cat, None, None


def multi_decode(a_nc: Tensor, cat: Tensor, widths: list[int], trainable: list[bool]) -> Tensor:
    """Dense codes (N, n) times the concatenated dictionaries (n, sum d_j)."""
    return _MultiDecode.apply(a_nc, cat, widths, trainable)


class _TopKReferenceAuxDecode(torch.autograd.Function):
    """ReLU, TopK, the reference's auxiliary codes and their decode, fused.

    Forward: ``values, indices = topk(relu(pre), k)``; ``aux = top n/2 of relu(pre) - z``;
    returns ``(values_nk, indices_nk, aux @ cat)``. The gradient w.r.t. ``pre`` equals
    autograd's through relu, topk and the selection: the aux path passes gradient exactly
    where ``aux > 0``, the TopK path where ``values > 0``, and the two supports are disjoint.
    """

    @staticmethod
    def forward(ctx, pre_nc: Tensor, cat: Tensor, select: Selection, widths: list[int],  # type: ignore
                trainable: list[bool]):
        aux_nc = pre_nc.detach().clamp_min(0)
        values_nk, indices_nk = select(aux_nc)
        # z out of the pool; a rule's zero padding (values 0) stays in it
        reference_aux_codes_(aux_nc.scatter_(1, indices_nk,
                                             aux_nc.gather(1, indices_nk) * (values_nk == 0)))
        ctx.save_for_backward(values_nk, indices_nk, aux_nc, cat)
        ctx.widths, ctx.trainable = widths, trainable
        ctx.mark_non_differentiable(indices_nk)
        return values_nk, indices_nk, aux_nc @ cat

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_hat):  # type: ignore[override]
        values_nk, indices_nk, aux_nc, cat = ctx.saved_tensors
        if grad_aux_hat is None:
            grad_pre = torch.zeros_like(aux_nc)
            grad_cat = None
        else:
            grad_pre = grad_aux_hat @ cat.T  # our own buffer: masked in place
            grad_pre.masked_fill_(aux_nc == 0, 0.0)
            grad_cat = (_weight_grad(aux_nc, grad_aux_hat, cat, ctx.widths, ctx.trainable)
                        if ctx.needs_input_grad[1] else None)
        if grad_values is not None:
            grad_pre.scatter_add_(1, indices_nk, grad_values * (values_nk > 0))
        return grad_pre, grad_cat, None, None, None


def topk_reference_aux_decode(pre_nc: Tensor, cat: Tensor, k: int | Selection, widths: list[int],
                              trainable: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(values_nk, indices_nk, aux_hat)`` with ``aux_hat = aux_codes @ cat`` (N, sum d_j).
    ``k``: TopK's k, or a sparsity rule's selection ``post_nc -> (values_nk, indices_nk)``."""
    select = as_selection(k)
    return _TopKReferenceAuxDecode.apply(pre_nc, cat, select, widths, trainable)


class _PairedCriterion(torch.autograd.Function):
    """Sum over models j of ``crit(x_j, xh_j) + coef * crit(x_j - xh_j, ah_j)`` in a few
    passes over the concatenated (N, sum d_j) tensors. ``crit`` is L1 or L2, each a mean over
    model j's own N x d_j elements (so every model weighs the same, as in the reference)."""

    @staticmethod
    def forward(ctx, x_nD: Tensor, xh_nD: Tensor, ah_nD: Tensor | None,  # type: ignore
                widths: list[int], coef: float, squared: bool, detach_residual: bool):
        r = x_nD - xh_nD
        e = r - ah_nD if ah_nD is not None else None
        n = x_nD.shape[0]
        bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
        main, aux = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            rs = r[:, a:b]
            main.append((rs.square().sum() if squared else rs.abs().sum()) / (n * (b - a)))
            if e is not None:
                es = e[:, a:b]
                aux.append((es.square().sum() if squared else es.abs().sum()) / (n * (b - a)))
        main_t = torch.stack(main)
        aux_t = torch.stack(aux) if aux else torch.zeros_like(main_t)
        ctx.save_for_backward(r, e if e is not None else r.new_empty(0))
        ctx.has_aux, ctx.widths, ctx.coef, ctx.squared = e is not None, widths, coef, squared
        ctx.detach_residual = detach_residual
        ctx.mark_non_differentiable(main_t, aux_t)
        total = main_t.sum() + coef * aux_t.sum()
        return total, main_t, aux_t

    @staticmethod
    def backward(ctx, grad_total, _gm, _ga):  # type: ignore[override]
        r, e = ctx.saved_tensors
        n = r.shape[0]
        w = torch.cat([r.new_full((wd,), 1.0 / (n * wd)) for wd in ctx.widths]) * grad_total
        if ctx.squared:
            w = 2 * w
        d_r = r * w if ctx.squared else torch.sign(r).mul_(w)
        grad_ah = None
        if ctx.has_aux:
            d_e = e * (w * ctx.coef) if ctx.squared else torch.sign(e).mul_(w * ctx.coef)
            if not ctx.detach_residual:
                d_r.add_(d_e)  # e = r - ah: e's gradient flows into r
            grad_ah = d_e.neg_() if ctx.needs_input_grad[2] else None
        grad_x = d_r if ctx.needs_input_grad[0] else None
        grad_xh = d_r.neg() if ctx.needs_input_grad[1] else None
        return grad_x, grad_xh, grad_ah, None, None, None, None


def paired_criterion(x_nD: Tensor, xh_nD: Tensor, ah_nD: Tensor | None, widths: list[int],
                     coef: float, squared: bool, detach_residual: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, main_m, aux_m)``: the step loss and its per-model parts (no gradient).

    ``detach_residual``: the aux term predicts a detached ``x - xh`` (Gao et al.'s AuxK)."""
    return _PairedCriterion.apply(x_nD, xh_nD, ah_nD, widths, coef, squared, detach_residual)
