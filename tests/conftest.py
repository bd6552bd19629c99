"""Shared fixtures: small, seeded, CPU-only."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# `scripts/mutation.py` names packages that tests import lazily (timm takes 3 s), so that
# mutmut's fork server imports them once, at collection, instead of every mutant's process.
for _package in filter(None, os.environ.get("USAE_TEST_PRELOAD", "").split(",")):
    importlib.import_module(_package)

# `scripts/mutation.py` points this at a folder of artifacts that the unmutated code built
# once, for a module whose code those artifacts never run (evaluate: the `trained` run is made
# by the store writer and the trainer alone). Each mutant's tests then copy them instead of
# rebuilding; the write flag is set only for that clean build.
ARTIFACTS_ENV = "USAE_TEST_ARTIFACTS"
ARTIFACTS_WRITE_ENV = "USAE_TEST_ARTIFACTS_WRITE"


def pytest_collection_modifyitems(config, items) -> None:
    """Under mutation testing (``USAE_TEST_ORDER``: mutmut's recorded test durations), the
    fastest tests first: a mutant's run stops at its first failing test (``-x``)."""
    path = os.environ.get("USAE_TEST_ORDER")
    if path and Path(path).exists():
        durations = json.loads(Path(path).read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def per_test_under_mutation(*modules: str) -> Callable[..., str]:
    """A fixture scope: "module", but "function" while ``scripts/mutation.py`` mutates one of
    ``modules`` (USAE_MUTATION_MODULE) and the fixture runs that module's code. mutmut credits
    what a module-scoped fixture calls to the first test alone, so the mutants of that code
    would meet only that test."""
    def scope(fixture_name: str, config) -> str:
        return "function" if os.environ.get("USAE_MUTATION_MODULE") in modules else "module"
    return scope


def exactly(message: str, kind: type[Exception] | None = None):
    """``pytest.raises`` for an error (a ``UsaeError`` unless ``kind`` says) whose whole
    message is ``message``."""
    from usae.errors import UsaeError

    return pytest.raises(kind or UsaeError, match="^" + re.escape(message) + "$")


class RecordingBar:
    """A stand-in for ``usae.progress.bar``: the keywords it was made with, each update, its
    postfix and whether it was closed."""

    def __init__(self, **kwargs) -> None:
        self.kw, self.updates, self.postfix, self.closed = kwargs, [], {}, False

    @property
    def n(self) -> int:
        return sum(self.updates)

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def progress_bars(monkeypatch):
    """``progress_bars(module, ...)`` replaces each module's ``progress_bar`` by
    ``RecordingBar``s; returns the list the bars made are appended to, in order."""
    made: list[RecordingBar] = []

    def patch(*modules) -> list[RecordingBar]:
        for module in modules:
            monkeypatch.setattr(module, "progress_bar",
                                lambda **kw: made.append(RecordingBar(**kw)) or made[-1])
        return made

    return patch


def prebuilt(name: str, dest: Path, build: Callable[[Path], None]) -> None:
    """``build(dest)``, or a copy of the artifact ``name`` built once (see ARTIFACTS_ENV)."""
    folder = os.environ.get(ARTIFACTS_ENV)
    if not folder:
        build(dest)
        return
    shared = Path(folder) / name
    complete = Path(folder) / f"{name}.complete"
    if not complete.exists():
        if not os.environ.get(ARTIFACTS_WRITE_ENV):
            build(dest)  # never share what a mutant built
            return
        # built in place, not renamed into place: a store records its images' absolute paths
        shutil.rmtree(shared, ignore_errors=True)
        build(shared)
        complete.touch()
    shutil.copytree(shared, dest, dirs_exist_ok=True)


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

    def build(dest: Path) -> None:
        res = subprocess.run([sys.executable, "-m", "usae", "demo", "--out", str(dest),
                              "--quick"], check=True, capture_output=True, text=True,
                             timeout=900)
        (dest / "stdout.txt").write_text(res.stdout)

    prebuilt("quick-demo", out, build)
    (out.parent / "stdout.txt").write_text((out / "stdout.txt").read_text())
    return out


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB filesystem (needs root and mount rights, as in CI); skipped otherwise."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def stop_after_commits(monkeypatch, n: int = 1) -> Callable[[], None]:
    """Make every store writer raise KeyboardInterrupt (as Ctrl-C) at its commit number
    ``n + 1``; returns a function that puts the real commit back."""
    from usae.store import writer as store_writer

    real_commit, commits = store_writer.StoreWriter.commit, []

    def commit_then_stop(self, *a, **k):
        if len(commits) == n:
            raise KeyboardInterrupt
        commits.append(1)
        return real_commit(self, *a, **k)

    monkeypatch.setattr(store_writer.StoreWriter, "commit", commit_then_stop)
    return lambda: monkeypatch.setattr(store_writer.StoreWriter, "commit", real_commit)


def cache_and_train(root: Path, specs: str, preset: str, keys: dict, **cache_kw) -> Path:
    """Cache ``root/imgs`` with ``specs`` into ``root/store`` and train ``root/run`` on its
    train split with ``preset`` and ``keys``; returns ``root``."""
    from usae.config import resolve
    from usae.data.cache import cache
    from usae.data.sources import StoreSource
    from usae.sae.training import train_run
    from usae.store.store import Store

    cache(specs, root / "imgs", root / "store", workers=0, progress=False, **cache_kw)
    store = Store(root / "store")
    cfg = resolve(store.models, store.dims, preset, keys)
    train_run(cfg, StoreSource(store, "train"), root / "run", progress=False)
    return root


@contextlib.contextmanager
def stand_in_hub(run: Path, repo_id: str, tmp_path: Path):
    """Serve ``run``'s config.json and weights as the Hub repository ``repo_id`` on 127.0.0.1
    (tests/fake_hub.py); yields the environment a client needs (its own HF_HOME, online)."""
    import sys

    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("config.json", "model.safetensors"):
        (shared / name).write_bytes((run / name).read_bytes())
    hub = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_hub.py")),
                            str(shared), repo_id], stdout=subprocess.PIPE, text=True)
    try:
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1",
               "HF_ENDPOINT": hub.stdout.readline().strip()}
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)  # huggingface_hub reads it as offline too
        yield env
    finally:
        hub.kill()
        hub.wait()
