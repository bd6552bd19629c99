"""TopK (the paper's rule): the k largest ReLU'd pre-activations of each token."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TopK:
    """``topk(post_nc, k)`` per token: exactly k entries (some 0 when fewer are positive)."""

    def buffers(self, n_concepts: int) -> dict[str, Tensor]:
        return {}

    def select(self, post_nc: Tensor, k: int, owner: nn.Module) -> tuple[Tensor, Tensor]:
        return torch.topk(post_nc, k, dim=1, sorted=False)
