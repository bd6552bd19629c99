"""The two strategy signatures of the objective seam (``usae.sae.objectives``)."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn


class SparsityRule(Protocol):
    """Which concepts fire. ``select`` maps ``post_nc = relu(pre)`` (n_tokens, n_concepts)
    to ``(values_nk, indices_nk)``: ``indices_nk`` distinct per row, ``values_nk`` the
    entries of ``post_nc`` there, or 0 where an entry does not fire (a rule whose count varies
    per token pads its rows with zeros: every kernel treats a zero value as inactive).

    ``select`` runs inside the training kernels' forward, without autograd; ``owner`` is the
    ``UniversalSAE``: its ``training`` flag, ``cfg`` and the buffers the rule asked for."""

    def buffers(self, n_concepts: int) -> dict[str, Tensor]:
        """State the rule keeps in the run's weights (registered as SAE buffers)."""
        ...

    def select(self, post_nc: Tensor, k: int, owner: nn.Module) -> tuple[Tensor, Tensor]:
        ...


class Criterion(Protocol):
    """The reconstruction loss over every model at once.

    ``x_nD``, ``xh_nD``: targets and reconstructions of all models concatenated along the
    features (n_tokens, sum d_j), model j's block ``widths[j]`` wide; ``ah_nD``: the auxiliary
    prediction of the residual ``x - xh`` (or None). Returns ``(total, recon_m, aux_m)``: the
    scalar to differentiate, each model's reconstruction term (M,) and auxiliary term (M,).
    Every model weighs the same (a mean over its own elements)."""

    def __call__(self, x_nD: Tensor, xh_nD: Tensor, ah_nD: Tensor | None, widths: list[int],
                 aux_coef: float, detach_residual: bool) -> tuple[Tensor, Tensor, Tensor]:
        ...
