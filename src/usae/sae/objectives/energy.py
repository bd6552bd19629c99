"""Energy (ours, issue 23): TopK's k as a ceiling, and of those k the fewest whose squared
activations carry ``energy_fraction`` of their squared sum, so the number of active concepts
adapts to each token (the "top-p" of nucleus sampling, on squared activations).

Why: with a fixed k far above the data's true number of active features, TopK fills every
code with weak concepts and the dictionary's directions blur (docs/RESULTS.md, "Ground
truth"); a k tuned to one data set is wrong for the next. With unit dictionary rows a
concept's squared activation is about the energy it adds to the reconstruction, so the weak
tail this rule drops is the part that explains least. Per token and without state: the
same rule in training and at inference, on one process or many.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def energy_codes(post_nc: Tensor, k: int, fraction: float) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``post_nc`` (n_tokens, n_concepts), largest
    first, as ``(values_nk, indices_nk)``; the values after the fewest whose squares reach
    ``fraction`` of the k squares' sum are set to 0 (inactive). ``fraction=1`` is TopK."""
    values_nk, indices_nk = torch.topk(post_nc, k, dim=1, sorted=True)
    squares_nk = values_nk * values_nk
    through_nk = squares_nk.cumsum(1)
    before_nk = through_nk - squares_nk  # the squares of the larger entries
    keep_nk = before_nk < fraction * through_nk[:, -1:]
    return values_nk * keep_nk, indices_nk


class Energy:
    """``energy_codes`` as a sparsity rule, with the SAE config's ``energy_fraction``."""

    def buffers(self, n_concepts: int) -> dict[str, Tensor]:
        return {}

    def select(self, post_nc: Tensor, k: int, owner: nn.Module) -> tuple[Tensor, Tensor]:
        return energy_codes(post_nc, k, owner.cfg.energy_fraction)


