"""Token-grid alignment between models: drop prefix tokens, resample patch grids.

All functions are differentiable (bilinear ``F.interpolate`` with antialias), so coordinated
activation maximization can backpropagate from codes to pixels through them.
Shapes: ``x_btd`` is (batch, tokens, d); a grid is (h, w) with h * w patch tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from usae.errors import UsaeError


def square_grid(n_tokens: int) -> tuple[int, tuple[int, int]]:
    """The reference's rule for (tokens, d) arrays: prefix = tokens - floor(sqrt(tokens))²;
    returns ``(prefix, (side, side))``."""
    side = math.isqrt(n_tokens)
    if side == 0:
        raise UsaeError(f"cannot infer a patch grid from {n_tokens} tokens")
    return n_tokens - side * side, (side, side)


def exact_square_grid(n_tokens: int, what: str = "the layer") -> tuple[int, int]:
    """``(side, side)`` for a token count that must be a perfect square (no prefix)."""
    prefix, grid = square_grid(n_tokens)
    if prefix:
        raise UsaeError(f"{what}: {n_tokens} tokens are not a square grid; pass the grid")
    return grid


def common_grid(grids: dict[str, tuple[int, int]], tolerance: float = 0.1) -> tuple[int, int]:
    """The smallest grid (the paper's choice); refuse grids of different aspect ratios."""
    ratios = {m: g[0] / g[1] for m, g in grids.items()}
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi / lo > 1 + tolerance:
        desc = ", ".join(f"{m}: {g[0]}x{g[1]}" for m, g in grids.items())
        raise UsaeError(f"token grids cannot be aligned, their aspect ratios differ ({desc}); "
                        "use the same input aspect ratio for every model")
    return min(grids.values(), key=lambda g: (g[0] * g[1], g))


def resample_tokens(x_btd: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """(B, h*w, d) patch tokens -> (B, H*W, d) on the target grid (bilinear, antialiased)."""
    b, t, d = x_btd.shape
    if t != grid[0] * grid[1]:
        raise UsaeError(f"{t} patch tokens do not form a {grid[0]}x{grid[1]} grid")
    if tuple(grid) == tuple(target):
        return x_btd
    img = x_btd.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    dtype = img.dtype
    out = F.interpolate(img.float(), size=tuple(target), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.to(dtype).reshape(b, d, target[0] * target[1]).transpose(1, 2)


def align_tokens(x_btd: Tensor, n_prefix: int, grid: tuple[int, int], target: tuple[int, int],
                 keep_cls: bool = False) -> Tensor:
    """Drop prefix tokens, resample the grid; with ``keep_cls`` the first token is kept as
    an extra leading row. Returns (B, [1 +] H*W, d)."""
    patches = resample_tokens(x_btd[:, n_prefix:], grid, target)
    if keep_cls:
        if n_prefix == 0:
            raise UsaeError("--keep-cls: this model has no CLS token")
        return torch.cat([x_btd[:, :1], patches], dim=1)
    return patches


def feature_map_to_tokens(fmap_bdhw: Tensor) -> Tensor:
    """A CNN feature map (B, C, H, W) -> (B, H*W, C) tokens, row-major."""
    b, c, h, w = fmap_bdhw.shape
    return fmap_bdhw.reshape(b, c, h * w).transpose(1, 2)
