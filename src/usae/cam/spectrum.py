"""The image prior of ``usae cam``: a mean Fourier magnitude and a colour basis estimated from
the user's own images (the store's sources), with an analytic 1/f fallback.

An image is ``clamp(mean + C · irfft2(magnitude · exp(i·phase)), 0, 1)``: ``C`` is the square
root of the RGB covariance (so the optimized channels are decorrelated), ``magnitude`` the
mean |FFT| of the decorrelated images. Only the phase is optimized.
Shapes: images (N, 3, S, S) in [0, 1]; magnitude (3, S, S // 2 + 1); colour (3, 3).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from usae.data.backbones.base import Preprocess
from usae.data.images import load_rgb, resize_crop
from usae.errors import UsaeError
from usae.files import atomic_save_safetensors

log = logging.getLogger(__name__)
FALLBACK_ALPHA = 1.0  # natural images: amplitude ~ 1/f


@dataclass
class Spectrum:
    """A fixed magnitude spectrum and colour basis; ``source`` says where they came from."""

    magnitude: Tensor  # (3, S, S//2+1)
    colour: Tensor  # (3, 3), the square root of the RGB covariance
    mean: Tensor  # (3,)
    source: str

    @property
    def size(self) -> int:
        return int(self.magnitude.shape[1])

    def to(self, device: torch.device | str) -> "Spectrum":
        return Spectrum(self.magnitude.to(device), self.colour.to(device), self.mean.to(device),
                        self.source)

    def random_phase(self, gen: torch.Generator) -> Tensor:
        """Uniform phases in [-pi, pi), shape (3, S, S//2+1), from ``gen``."""
        return (torch.rand(self.magnitude.shape, generator=gen) * 2 - 1) * math.pi

    def image(self, phase: Tensor) -> Tensor:
        """(1, 3, S, S) in [0, 1] for a phase (differentiable in the phase)."""
        spec = torch.polar(self.magnitude, phase)
        decorrelated = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        rgb = torch.einsum("ij,jhw->ihw", self.colour, decorrelated) + self.mean.view(3, 1, 1)
        return rgb.clamp(0, 1)[None]


def radial_frequency(size: int) -> Tensor:
    """|f| in cycles per pixel on the rfft2 grid, (S, S//2+1)."""
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    return torch.sqrt(fy ** 2 + fx ** 2)


def estimate_spectrum(images_n3hw: Tensor, source: str) -> Spectrum:
    """Colour basis and mean decorrelated magnitude of a stack of images."""
    x = images_n3hw.double()
    pixels = x.permute(1, 0, 2, 3).reshape(3, -1)
    mean = pixels.mean(1)
    cov = torch.cov(pixels) + 1e-6 * torch.eye(3, dtype=x.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    colour = evecs @ torch.diag(evals.clamp_min(1e-8).sqrt()) @ evecs.T
    decorrelate = torch.linalg.inv(colour)
    d = torch.einsum("ij,njhw->nihw", decorrelate, x - mean.view(1, 3, 1, 1))
    magnitude = torch.fft.rfft2(d, norm="ortho").abs().mean(0)
    return Spectrum(magnitude.float(), colour.float(), mean.float(), source)


def analytic_spectrum(size: int, alpha: float = FALLBACK_ALPHA) -> Spectrum:
    """1/f^alpha magnitude (unit variance per channel) and grey-ish colour statistics: a
    colour basis of 0.12 on the diagonal plus 0.08 everywhere (pixel std 0.23 per channel,
    channels correlated 0.73), mean 0.45."""
    f = radial_frequency(size).clamp_min(1.0 / size)
    mag = f ** -alpha
    mag[0, 0] = 0.0
    mag = mag / mag.square().mean().sqrt()  # irfft2 (ortho) gives unit-variance pixels
    colour = torch.full((3, 3), 0.08) + torch.eye(3) * 0.12
    return Spectrum(mag.expand(3, -1, -1).clone(), colour, torch.full((3,), 0.45),
                    f"analytic 1/f^{alpha:g} (no source images were readable)")


def fit_alpha(magnitude: Tensor) -> float:
    """The exponent alpha of magnitude ~ f^-alpha, by least squares in log-log space over
    frequencies between 2 and S/4 cycles per image (away from DC and aliasing)."""
    size = magnitude.shape[-2]
    f = radial_frequency(size)
    keep = (f >= 2.0 / size) & (f <= 0.25)
    mag = magnitude.mean(0) if magnitude.ndim == 3 else magnitude
    lf, lm = torch.log(f[keep]).double(), torch.log(mag[keep].clamp_min(1e-12)).double()
    slope = ((lf - lf.mean()) * (lm - lm.mean())).sum() / ((lf - lf.mean()) ** 2).sum()
    return float(-slope)


def load_source_images(paths: list[str], size: int, limit: int) -> Tensor:
    """Up to ``limit`` readable images, short side resized and centre-cropped to S x S."""
    pre = Preprocess(crop=(size, size), resize=size, interpolation="bilinear")
    out = []
    for p in paths:
        if len(out) >= limit:
            break
        try:
            out.append(resize_crop(load_rgb(p), pre))
        except (UsaeError, OSError):
            continue
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def load_or_estimate_spectrum(store, cache: Path, size: int, limit: int) -> Spectrum:
    """The cached spectrum of this size, else one estimated from the store's source images
    (saved to ``cache``), else the analytic fallback (logged)."""
    if cache.exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as fh:
            if int(fh.get_slice("magnitude").get_shape()[1]) == size:
                return Spectrum(fh.get_tensor("magnitude"), fh.get_tensor("colour"),
                                fh.get_tensor("mean"),
                                (fh.metadata() or {}).get("source", "cached"))
    paths = [i["path"] for i in store.manifest["images"] if not i.get("skipped")]
    rng = np.random.default_rng(0)
    paths = [paths[i] for i in rng.permutation(len(paths))]
    images = load_source_images(paths, size, limit)
    if len(images) < 8:
        log.warning("warning: only %d of the store's source images are readable; using an "
                    "analytic 1/f spectrum for CAM", len(images))
        return analytic_spectrum(size)
    spectrum = estimate_spectrum(images, f"estimated from {len(images)} of the store's images")
    atomic_save_safetensors(cache, {"magnitude": spectrum.magnitude, "colour": spectrum.colour,
                                    "mean": spectrum.mean}, metadata={"source": spectrum.source})
    return spectrum
