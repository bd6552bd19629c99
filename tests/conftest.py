"""Shared fixtures: small, seeded, CPU-only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_latent_arrays(n_images: int = 48, tokens: int = 4, dims=(12, 8, 10), seed: int = 0,
                         n_latent: int = 6) -> dict[str, np.ndarray]:
    """Activations of three 'models' that are linear views of one sparse latent."""
    rng = np.random.default_rng(seed)
    z = rng.exponential(size=(n_images, tokens, n_latent)) * (rng.random((n_images, tokens,
                                                                          n_latent)) < 0.4)
    out = {}
    for i, d in enumerate(dims):
        mix = rng.normal(size=(n_latent, d))
        out[f"m{i}"] = (z @ mix + 0.01 * rng.normal(size=(n_images, tokens, d)) + i
                        ).astype(np.float32)
    return out


def write_noise_images(root, n: int, seed: int = 0, shape=(40, 48)):
    """``n`` seeded noise PNGs named 00.png, 01.png, ... in ``root``; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(
            root / f"{i:02d}.png")
    return root


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    """Three linear views (d = 12, 8, 10) of one sparse latent, 48 images x 4 tokens."""
    return shared_latent_arrays()


@pytest.fixture(scope="session")
def make_arrays():
    """The factory behind ``arrays``, for other sizes: ``make_arrays(n_images=40, ...)``."""
    return shared_latent_arrays


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``usae demo --quick`` once per session (real EfficientNet-Lites, bundled photos)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    res = subprocess.run([sys.executable, "-m", "usae", "demo", "--out", str(out), "--quick"],
                         check=True, capture_output=True, text=True, timeout=900)
    (out.parent / "stdout.txt").write_text(res.stdout)
    return out
