"""The backbone interface: pixels in, (B, tokens, d) activations out, differentiably.

An adapter owns its preprocessing (size, interpolation, crop, mean/std), knows its prefix
tokens and patch grid, and reads one layer (default: the final features after the model's
final norm, as in the paper). ``forward`` is plain autograd so activation maximization can
backpropagate through it; ``extract`` wraps it in ``inference_mode`` for caching.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from usae.errors import UsaeError

# Normalization constants (mean, std) of the families we know, in one place.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``resize`` (then center-crop ``crop``), normalize."""

    crop: tuple[int, int] = (224, 224)
    resize: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Backbone:
    """A model adapter. Subclasses set the fields and implement ``_features``."""

    name: str
    spec: str
    module: nn.Module
    d: int
    n_prefix: int
    grid: tuple[int, int]
    layer: str
    preprocess: Preprocess = field(default_factory=Preprocess)

    def _features(self, pixels_bchw: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, pixels_bchw: Tensor) -> Tensor:
        """Normalized pixels (B, 3, H, W) -> activations (B, n_prefix + h*w, d)."""
        out = self._features(pixels_bchw)
        expected = self.n_prefix + self.grid[0] * self.grid[1]
        if out.ndim != 3 or out.shape[1] != expected or out.shape[2] != self.d:
            raise UsaeError(f"{self.name}: layer {self.layer!r} gave shape {tuple(out.shape)}, "
                            f"expected (B, {expected}, {self.d})")
        return out

    @torch.inference_mode()
    def extract(self, pixels_bchw: Tensor) -> Tensor:
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        pixels_bchw = pixels_bchw.to(device, non_blocking=True)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.forward(pixels_bchw).float()
        return self.forward(pixels_bchw)

    has_head = False  # adapters whose model ends in a classifier set this

    def splicer(self, pixels_bchw: Tensor) -> tuple[Tensor, Any]:
        """For faithfulness: the cached layer's native tokens (B, n_prefix + h*w, d) on these
        normalized pixels, and ``run(tokens) -> logits (B, classes)``, the rest of the model
        from that layer to its output (``run(tokens)`` on the unmodified tokens is exactly
        the model's own forward)."""
        raise UsaeError(f"{self.name}: this model has no classification head to run")

    def to(self, device: str | torch.device) -> "Backbone":
        self.module.to(device)
        return self

    def info(self) -> dict[str, Any]:
        return {"spec": self.spec, "d": self.d, "grid": list(self.grid),
                "prefix_tokens": self.n_prefix, "layer": self.layer,
                "preprocess": self.preprocess.to_json()}


class StopForward(Exception):
    """Raised by a ``LayerHook(stop=True)`` to skip the layers after the one we read."""


class LayerHook:
    """Captures the output of one named submodule during a forward pass. With ``stop`` the
    forward pass ends right there (run it through ``run_until``)."""

    def __init__(self, module: nn.Module, layer: str, stop: bool = False) -> None:
        self.stop = stop
        modules = dict(module.named_modules())
        if layer not in modules:
            near = [n for n in modules if n and (layer in n or n in layer)][:8]
            raise UsaeError(f"layer {layer!r} does not exist in this model"
                            + (f"; similar names: {near}" if near else
                               f"; some names: {[n for n in modules if n][:8]}"))
        self.output: Tensor | None = None
        self._handle = modules[layer].register_forward_hook(self._store)

    def _store(self, _module: nn.Module, _inp: Any, out: Any) -> None:
        self.output = out[0] if isinstance(out, (tuple, list)) else out
        if self.stop:
            raise StopForward

    def run_until(self, fn, *args: Any) -> Tensor:
        """Call ``fn(*args)`` and return the hooked output, stopping early when allowed."""
        try:
            fn(*args)
        except StopForward:
            pass
        return self.pop()

    def pop(self) -> Tensor:
        if self.output is None:
            raise UsaeError("the hooked layer did not run in the forward pass")
        out, self.output = self.output, None
        return out

    def remove(self) -> None:
        self._handle.remove()

    def spliced(self, module: nn.Module, layer: str, call: Any, replace: Any) -> Tensor:
        """``call()`` run to its end with ``layer``'s output passed through ``replace``
        (tokens in, tokens out; a CNN map is turned into tokens and back)."""
        def swap(_module: nn.Module, _inp: Any, out: Any) -> Any:
            if replace is None:
                return None
            tensor = out[0] if isinstance(out, (tuple, list)) else out
            new = replace(tokens_of(tensor))
            new = tokens_back(new, tensor)
            return (new, *out[1:]) if isinstance(out, (tuple, list)) else new

        handle = dict(module.named_modules())[layer].register_forward_hook(swap)
        stop, self.stop = self.stop, False
        try:
            return call()
        finally:
            handle.remove()
            self.stop, self.output = stop, None


def tokens_of(out: Tensor) -> Tensor:
    """A layer output as (B, T, d): CNN maps (B, C, H, W) become H*W tokens, row-major."""
    if out.ndim == 4:
        b, c, h, w = out.shape
        return out.reshape(b, c, h * w).transpose(1, 2)
    return out


def tokens_back(tokens_btd: Tensor, like: Tensor) -> Tensor:
    """(B, T, d) tokens in the layout of ``like`` (a CNN map (B, C, H, W) or tokens)."""
    if like.ndim == 4:
        b, c, h, w = like.shape
        return tokens_btd.transpose(1, 2).reshape(b, c, h, w).to(like.dtype)
    return tokens_btd.to(like.dtype)


def probe_shape(fn, size: tuple[int, int]) -> tuple[int, ...]:
    """Run ``fn`` on one zero image (1, 3, *size) to read an output shape."""
    with torch.inference_mode():
        return tuple(fn(torch.zeros(1, 3, *size)).shape)
