"""BatchTopK (Bussmann et al., 2024): the k x N largest activations of a batch of N tokens,
not k per token, so a token with more going on uses more concepts.

In training, the selection runs over the global batch (every torchrun rank's slice together,
``distributed.kth_largest_over_ranks``). Each step also moves a threshold, saved in the run's
weights: an exponential moving average of the smallest activation kept. Inference (eval mode)
keeps what exceeds that threshold, so a token's code does not depend on its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from usae.distributed import kth_largest_over_ranks

THRESHOLD = "batch_topk_threshold"  # the SAE buffer's name (in model.safetensors)
SEEN = "batch_topk_steps"  # steps averaged into it (the first one sets it)
MOMENTUM = 0.01  # weight of each new step's threshold in the average


def padded_selection(post_nc: Tensor, keep_nc: Tensor) -> tuple[Tensor, Tensor]:
    """The entries of ``post_nc`` where ``keep_nc`` as ``(values_nk, indices_nk)``, each row
    padded with zeros to the longest row's count (at least 1)."""
    width = max(int(keep_nc.sum(1).max()), 1) if keep_nc.numel() else 1
    width = min(width, post_nc.shape[1])
    values_nk, indices_nk = torch.topk(post_nc * keep_nc, width, dim=1, sorted=False)
    return values_nk, indices_nk


class BatchTopK:
    """``k x N`` entries over the batch in training; ``post > threshold`` at inference."""

    def buffers(self, n_concepts: int) -> dict[str, Tensor]:
        return {THRESHOLD: torch.zeros(()), SEEN: torch.zeros((), dtype=torch.int64)}

    def select(self, post_nc: Tensor, k: int, owner: nn.Module) -> tuple[Tensor, Tensor]:
        threshold = getattr(owner, THRESHOLD)
        if not owner.training:
            return padded_selection(post_nc, (post_nc >= threshold) & (post_nc > 0))
        smallest = kth_largest_over_ranks(post_nc.reshape(-1), k * post_nc.shape[0])
        keep_nc = (post_nc >= smallest) & (post_nc > 0)
        with torch.no_grad():
            seen = getattr(owner, SEEN)
            observed = smallest.clamp_min(0).to(threshold.dtype)
            weight = 1.0 if int(seen) == 0 else MOMENTUM
            threshold.mul_(1 - weight).add_(observed * weight)
            seen.add_(1)
        return padded_selection(post_nc, keep_nc)
