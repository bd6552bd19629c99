"""TopK (the paper's rule): the k largest ReLU'd pre-activations of each token."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

# post_nc -> (values_nk, indices_nk): a rule's selection, as the step's kernels call it
Selection = Callable[[Tensor], tuple[Tensor, Tensor]]


def topk_codes(post_nc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk(post_nc, k)`` per token: exactly k entries (some 0 when fewer are positive)."""
    return torch.topk(post_nc, k, dim=1, sorted=False)


def as_selection(k: int | Selection) -> Selection:
    """A kernel's ``k`` argument as a selection: TopK's k, or a rule's selection as given."""
    return k if callable(k) else (lambda post_nc: topk_codes(post_nc, k))


class TopK:
    """``topk_codes`` as a sparsity rule."""

    def buffers(self, n_concepts: int) -> dict[str, Tensor]:
        return {}

    def select(self, post_nc: Tensor, k: int, owner: nn.Module) -> tuple[Tensor, Tensor]:
        return topk_codes(post_nc, k)
