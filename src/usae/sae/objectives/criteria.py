"""The reconstruction criteria l1 (the paper's) and l2, through the fused kernel
(``usae.sae.fused.paired_criterion``: one pass for every model's term and its auxiliary term)."""

from __future__ import annotations

from torch import Tensor

from usae.sae.fused import paired_criterion


class L1:
    """Mean |x - x_hat| per model (the paper's criterion)."""

    squared = False

    def __call__(self, x_nD: Tensor, xh_nD: Tensor, ah_nD: Tensor | None, widths: list[int],
                 aux_coef: float, detach_residual: bool) -> tuple[Tensor, Tensor, Tensor]:
        return paired_criterion(x_nD, xh_nD, ah_nD, widths, aux_coef, squared=self.squared,
                                detach_residual=detach_residual)


class L2(L1):
    """Mean (x - x_hat)^2 per model."""

    squared = True
