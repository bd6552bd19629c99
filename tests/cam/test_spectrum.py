"""CAM's image prior (``usae.cam.spectrum``) against NumPy and PIL: the frequency grid, the
image formula, the colour basis and magnitude of known noise, the fitted exponent, the
source images, and the cache."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from usae.cam.spectrum import (
    Spectrum,
    analytic_spectrum,
    estimate_spectrum,
    fit_alpha,
    load_or_estimate_spectrum,
    load_source_images,
    radial_frequency,
)


def _grid(size: int) -> np.ndarray:
    return np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2)


@pytest.mark.parametrize("size", [8, 9, 32])
def test_the_frequency_grid_is_numpys_rfft2_grid(size):
    got = radial_frequency(size)
    assert got.shape == (size, size // 2 + 1)
    np.testing.assert_allclose(got.numpy(), _grid(size), atol=1e-7)


@pytest.mark.parametrize("size", [16, 15])
def test_an_image_is_the_documented_formula_computed_with_numpy(size):
    """clamp(mean + C · irfft2(magnitude · exp(i·phase)), 0, 1), odd sizes included."""
    g = np.random.default_rng(size)
    mag = g.uniform(0, 2, (3, size, size // 2 + 1)).astype(np.float32)
    colour = g.normal(0, 0.3, (3, 3)).astype(np.float32)
    mean = g.uniform(0.3, 0.7, 3).astype(np.float32)
    s = Spectrum(torch.from_numpy(mag), torch.from_numpy(colour), torch.from_numpy(mean), "t")
    phase = s.random_phase(torch.Generator().manual_seed(0))
    got = s.image(phase)
    d = np.fft.irfft2(mag * np.exp(1j * phase.numpy()), s=(size, size), norm="ortho")
    want = np.clip(np.einsum("ij,jhw->ihw", colour, d) + mean[:, None, None], 0, 1)
    assert got.shape == (1, 3, size, size) and s.size == size
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-5)
    assert (want == 0).any() and (want == 1).any()  # both ends of the clamp are reached


def test_phases_are_uniform_over_one_turn_and_seeded():
    s = Spectrum(torch.ones(3, 64, 33), torch.eye(3), torch.zeros(3), "t")
    p = s.random_phase(torch.Generator().manual_seed(3))
    assert p.shape == (3, 64, 33)
    assert float(p.min()) >= -math.pi and float(p.max()) < math.pi
    assert (p < -3).any() and (p > 3).any() and abs(float(p.mean())) < 0.05
    assert torch.equal(p, s.random_phase(torch.Generator().manual_seed(3)))


def test_the_estimate_of_coloured_noise_recovers_its_colour_and_a_flat_magnitude():
    """Pixels mixed by a known matrix: the colour basis is the symmetric square root of their
    covariance (NumPy's eigh), the mean their mean, and the decorrelated channels are white
    noise of unit variance, whose orthonormal |FFT| averages sqrt(pi)/2 (Rayleigh) off DC."""
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[0.2, 0.05, 0.0], [0.05, 0.15, 0.02], [0.0, 0.02, 0.1]])
    mu = torch.tensor([0.4, 0.5, 0.6])
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 32, 32, generator=g)) \
        + mu.view(3, 1, 1)
    s = estimate_spectrum(x, "known noise")
    pixels = x.permute(1, 0, 2, 3).reshape(3, -1).double().numpy()
    w, v = np.linalg.eigh(np.cov(pixels) + 1e-6 * np.eye(3))
    np.testing.assert_allclose(s.colour.numpy(), v @ np.diag(np.sqrt(w)) @ v.T, atol=1e-6)
    np.testing.assert_allclose(s.mean.numpy(), pixels.mean(1), atol=1e-6)
    assert s.magnitude.shape == (3, 32, 17) and s.source == "known noise"
    off_dc = s.magnitude.clone()
    off_dc[:, 0, 0] = float("nan")
    assert float(off_dc.nanmean()) == pytest.approx(math.sqrt(math.pi) / 2, abs=0.02)
    assert float(s.magnitude[:, 0, 0].max()) < 2.0  # the mean was removed before the FFT


def test_fit_alpha_is_a_least_squares_slope_over_its_band():
    """Against NumPy's polyfit on log-log values in 2/S <= f <= 1/4, on a magnitude with no
    power law at all (so any other band or formula gives another number)."""
    mag = torch.rand(3, 64, 33, generator=torch.Generator().manual_seed(1)) + 0.1
    f = _grid(64)
    keep = (f >= 2 / 64) & (f <= 0.25)
    slope = np.polyfit(np.log(f[keep]), np.log(mag.mean(0).numpy()[keep]), 1)[0]
    assert fit_alpha(mag) == pytest.approx(-slope, rel=2e-5)
    assert fit_alpha(mag.mean(0)) == pytest.approx(-slope, rel=2e-5)  # one channel given


def test_the_analytic_spectrum_is_one_over_f_with_unit_variance_and_grey_colours():
    s = analytic_spectrum(32, alpha=1.5)
    f = _grid(32)
    want = np.where(f == 0, 0.0, np.maximum(f, 1 / 32) ** -1.5)
    want = want / np.sqrt((want ** 2).mean())
    assert s.magnitude.shape == (3, 32, 17)
    for c in range(3):
        np.testing.assert_allclose(s.magnitude[c].numpy(), want, rtol=1e-5)
    assert s.magnitude[0, 0, 1] > s.magnitude[0, 0, 2] > 0 and s.magnitude[0, 0, 0] == 0
    cov = (s.colour @ s.colour.T).numpy()  # the pixel covariance it implies
    std = np.sqrt(np.diag(cov))
    assert std == pytest.approx([0.23] * 3, abs=0.005)
    assert cov[0, 1] / (std[0] * std[1]) == pytest.approx(0.727, abs=0.005)  # grey-ish
    assert s.mean.tolist() == pytest.approx([0.45] * 3)
    assert "analytic 1/f^1.5" in s.source


def _noise_png(path, w: int, h: int, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_source_images_are_resized_bilinear_and_centre_cropped_skipping_bad_ones(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    for i, (w, h) in enumerate([(60, 40), (30, 50), (16, 16), (20, 20)]):
        _noise_png(tmp_path / f"{i}.png", w, h, i)
    paths = [str(tmp_path / "bad.jpg")] + [str(tmp_path / f"{i}.png") for i in range(4)]
    got = load_source_images(paths, 16, limit=3)
    assert got.shape == (3, 3, 16, 16)
    # by hand: 60 x 40, short side 40 -> 16: 24 x 16 (bilinear), then the centre 16 x 16
    want = Image.open(tmp_path / "0.png").resize((24, 16), Image.BILINEAR).crop((4, 0, 20, 16))
    np.testing.assert_array_equal((got[0] * 255).round().byte().permute(1, 2, 0).numpy(),
                                  np.asarray(want))
    want = Image.open(tmp_path / "1.png").resize((16, 27), Image.BILINEAR).crop((0, 5, 16, 21))
    np.testing.assert_array_equal((got[1] * 255).round().byte().permute(1, 2, 0).numpy(),
                                  np.asarray(want))
    assert load_source_images([str(tmp_path / "bad.jpg")], 16, 4).shape == (0, 3, 16, 16)


def _store(paths, skipped=()):
    return SimpleNamespace(manifest={"images": [
        {"path": str(p), **({"skipped": True} if i in skipped else {})}
        for i, p in enumerate(paths)]})


def test_eight_readable_images_make_an_estimate_and_seven_do_not(tmp_path, caplog):
    paths = []
    for i in range(9):
        _noise_png(tmp_path / f"{i}.png", 20, 20, i)
        paths.append(tmp_path / f"{i}.png")
    # the ninth image is marked skipped by the cache: never read
    s = load_or_estimate_spectrum(_store(paths, skipped={8}), tmp_path / "a.safetensors",
                                  16, 64)
    assert s.source == "estimated from 8 of the store's images"
    with caplog.at_level(logging.WARNING, logger="usae.cam.spectrum"):
        s = load_or_estimate_spectrum(_store(paths[:7]), tmp_path / "b.safetensors", 16, 64)
    assert s.source.startswith("analytic 1/f")
    assert caplog.messages == ["warning: only 7 of the store's source images are readable; "
                               "using an analytic 1/f spectrum for CAM"]
    assert not (tmp_path / "b.safetensors").exists()  # a fallback is not cached


def test_a_cached_spectrum_is_used_whole_even_when_the_images_are_gone(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for i in range(12):
        _noise_png(tmp_path / f"{i}.png", 20, 20, i)
        paths.append(tmp_path / f"{i}.png")
    cache = tmp_path / "spectrum.safetensors"
    first = load_or_estimate_spectrum(_store(paths), cache, 16, 10)
    again_fresh = load_or_estimate_spectrum(_store(paths), tmp_path / "other.safetensors", 16, 10)
    assert torch.equal(first.magnitude, again_fresh.magnitude)  # the same seeded sample
    for p in paths:
        p.unlink()
    cached = load_or_estimate_spectrum(_store(paths), cache, 16, 10)
    assert cached.source == first.source == "estimated from 10 of the store's images"
    for key in ("magnitude", "colour", "mean"):
        assert torch.equal(getattr(cached, key), getattr(first, key)), key
    save_file({"magnitude": first.magnitude, "colour": first.colour, "mean": first.mean},
              str(tmp_path / "bare.safetensors"))  # a cache without its metadata
    assert load_or_estimate_spectrum(_store(paths), tmp_path / "bare.safetensors", 16,
                                     10).source == "cached"
