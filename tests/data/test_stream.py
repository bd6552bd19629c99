"""Training that streams activations from the backbones (no store)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_noise_images
from tests.sae.test_distributed import TORCHRUN, _env, assert_same_run, free_port
from usae.cli import main
from usae.data.cache import cache
from usae.data.streaming import train_from_images
from usae.errors import UsaeError
from usae.sae.interrupts import TrainingInterrupted
from usae.sae.trainer import Trainer
from usae.sae.training import train_from_store

SPEC = "effnet:lite0?img_size=64&name=a,effnet:lite1?img_size=64&name=b"  # pretrained, offline
SETS = ["n_concepts=32", "k=4", "batch_images=4", "log_every=1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("simgs"), 24, seed=1)


def stream(images, out, **kw):
    return train_from_images(images, SPEC, out, sets=SETS, max_steps=10, progress=False,
                             workers=0, **kw)


@pytest.mark.parametrize("data", [{}, {"val_fraction": 0.3,
                                      "split_seed": 5}])
def test_streaming_equals_training_on_the_cached_store(images, tmp_path, data):
    """The same activations either way, with cache's image options given to both."""
    cache(SPEC, images, tmp_path / "store", batch_size=4, workers=0, dtype="float32",
          progress=False, **data)
    train_from_store(tmp_path / "store", tmp_path / "from_store", sets=SETS, max_steps=10,
                     progress=False)
    summary = stream(images, tmp_path / "streamed", **data)
    assert summary["steps"] == 10
    assert_same_run(tmp_path / "from_store", tmp_path / "streamed", steps=10)
    config = (tmp_path / "streamed" / "config.json").read_text()
    assert '"stream"' in config and '"stats_images": 24' in config


def test_streaming_resumes_to_the_uninterrupted_run(images, tmp_path, monkeypatch):
    stream(images, tmp_path / "whole")
    real = Trainer.train_step

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(TrainingInterrupted):
        stream(images, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_step", real)
    stream(images, tmp_path / "cut", resume=True)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), \
        load_file(tmp_path / "cut" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_streaming_on_two_ranks_equals_one(images, tmp_path):
    args = ["train", "--images", str(images), "--models", SPEC, "--max-steps", "10",
            "--workers", "0", "--no-progress", *[x for s in SETS for x in ("--set", s)]]
    stream(images, tmp_path / "one")  # here, on two threads: the backbones' outputs may differ
    # from the one-thread workers' in the last bits, well inside the tolerance
    two = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), "-m", "usae", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                         env=_env())
    assert two.returncode == 0, two.stderr[-2000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=10)


def test_streaming_mistakes_are_clear(images, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted(images.iterdir())[:8]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "03.png").write_bytes(b"broken")
    with pytest.raises(UsaeError, match="cannot stream .*03.png.* then --resume"):
        stream(bad, tmp_path / "r")
    out = str(tmp_path / "r2")
    assert main(["train", "--out", out]) == 2
    assert "give either --store" in capsys.readouterr().err
    assert main(["train", "--images", str(images), "--out", out]) == 2
    assert "--images needs --models" in capsys.readouterr().err
