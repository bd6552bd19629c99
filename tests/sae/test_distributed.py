"""Data-parallel training under torchrun (gloo, 127.0.0.1): N processes compute the same run
as one process on the same global batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from usae.config import resolve
from usae.data.sources import ArraySource, StoreSource, shard_slice
from usae.distributed import Dist, GlobalBatchNorm1d, shard_range, sync_batch_norms
from usae.errors import UsaeError
from usae.sae.trainer import Trainer
from usae.sae.training import train_from_store
from usae.store.writer import store_from_arrays

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS = ["--max-steps", "20", "--set", "n_concepts=32", "--set", "k=4", "--set",
         "batch_images=8", "--set", "log_every=1", "--no-progress"]
# A linear layer followed by BatchNorm has a bias the loss cannot see (BN subtracts the mean):
# its gradient is rounding noise, which Adam turns into lr-sized steps in any run. Those
# tensors (and the running mean that tracks them) are compared through the function instead.
GAUGE = (".linear.bias", ".norm.running_mean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, timeout: float = 120, **kw
             ) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "usae", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory, make_arrays):
    path = tmp_path_factory.mktemp("ddp") / "store"
    n = 64
    return store_from_arrays(path, make_arrays(n_images=n, tokens=4), dtype="float32",
                             splits=["train"] * n).path


def one_process(store, out, sets=()):
    sets_list = ["n_concepts=32", "k=4", "batch_images=8", "log_every=1", *sets]
    train_from_store(store, out, sets=sets_list, max_steps=20, progress=False)


def assert_same_run(a: Path, b: Path, rtol: float = 1e-5, steps: int = 20) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        if key.endswith(GAUGE):
            continue
        scale = float(wa[key].double().abs().max()) or 1.0
        diff = float((wa[key].double() - wb[key].double()).abs().max())
        assert diff <= rtol * scale, (key, diff, scale)
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == steps
    for ra, rb in zip(la, lb):
        assert (ra["step"], ra["source"], ra["tokens"]) == (rb["step"], rb["source"], rb["tokens"])
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rtol)
        assert ra["dead_fraction"] == pytest.approx(rb["dead_fraction"], abs=1e-9)
        for m in ra["recon"]:
            assert ra["recon"][m] == pytest.approx(rb["recon"][m], rel=rtol)


VARIANTS = {"paper": (), "decoder_all": ("decoder_update=all",),
            "linear_auxk": ("encoder=linear", "aux=gao", "dead_after_tokens=40"),
            # the selection runs over the global batch: the same kept set as one process
            "batchtopk": ("encoder=linear", "aux=gao", "dead_after_tokens=40",
                           "sparsity=batchtopk", "matryoshka=8"),
            "global_topk": ("encoder=linear", "aux=gao", "dead_after_tokens=40",
                            "decoder_update=all", "schedule=global", "active_set=global",
                            "cross_coef=0.5")}


def test_two_processes_train_the_same_run_as_one(store, tmp_path):
    """The paper preset, decoder_update=all and the sparse AuxK step, in one torchrun job;
    and the CLI path."""
    res = torchrun(2, ["train", "--store", str(store), "--out", str(tmp_path / "two"), *STEPS])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, "only rank 0 reports"
    script = tmp_path / "variants.py"
    script.write_text(textwrap.dedent(f"""
        from usae.distributed import Dist
        from usae.sae.training import train_from_store
        dist = Dist.from_env()
        for name, sets in {dict(VARIANTS)!r}.items():
            train_from_store({str(store)!r}, {str(tmp_path)!r} + "/two-" + name,
                             sets=["n_concepts=32", "k=4", "batch_images=8", "log_every=1",
                                   *sets], max_steps=20, progress=False, dist=dist)
        dist.close()
    """))
    res = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), str(script)], capture_output=True,
                         text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    for name, sets in VARIANTS.items():
        one_process(store, tmp_path / f"one-{name}", sets)
        assert_same_run(tmp_path / f"one-{name}", tmp_path / f"two-{name}")
    assert_same_run(tmp_path / "one-paper", tmp_path / "two")
    rows = [json.loads(x) for x in
            (tmp_path / "two-linear_auxk" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["dead_fraction"] > 0 and r["aux"] > 0 for r in rows), "AuxK never ran"


def test_two_nodes_on_loopback_train_the_same_run(store, tmp_path):
    one_process(store, tmp_path / "one")
    port = free_port()
    procs = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t",
         "--local_addr", "127.0.0.1", "-m", "usae", "train", "--store", str(store), "--out",
         str(tmp_path / "two"), *STEPS], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_killed_run_resumes_with_another_world_size(store, tmp_path):
    sets = ["n_concepts=2048", "k=8", "batch_images=8", "log_every=1", "checkpoint_every=1000",
            "encoder=linear"]
    train_from_store(store, tmp_path / "one", sets=sets, max_steps=400, progress=False)
    run = tmp_path / "two"
    proc = subprocess.Popen(
        [*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), "-m", "usae", "train", "--store", str(store), "--out", str(run),
         "--max-steps", "400", "--no-progress", *[x for s in sets for x in ("--set", s)]],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    proc.communicate(timeout=120)
    status = json.loads((run / "config.json").read_text())["status"]
    assert status["state"] == "partial", "the run ended before the kill; make it longer"
    assert 0 < status["step"] < 400
    train_from_store(store, run, sets=sets, max_steps=400, progress=False, resume=True)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(run / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_world_size_that_does_not_split_the_batch_is_a_clear_error(store, tmp_path):
    cfg = resolve(("a",), (4,), "paper", {"batch_images": 8})
    with pytest.raises(UsaeError, match="3 processes cannot split a batch of 8 images evenly"):
        Trainer(cfg, tmp_path / "r", dist=Dist(rank=0, world=3))  # before any collective
    with pytest.raises(UsaeError, match="cannot split"):
        shard_slice(8, (1, 3))


def _rank(rank: int, port: int, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "usae", *args],
        env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ranks_with_different_configs_are_refused(store, tmp_path):
    port = free_port()
    base = ["train", "--store", str(store), "--out", str(tmp_path / "r"), *STEPS]
    procs = [_rank(0, port, base), _rank(1, port, [*base, "--set", "k=5"])]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 2 for p in procs), errs
    assert all("the ranks were started with different configs" in e for e in errs)


@pytest.mark.parametrize("how", ["dead", "hung"])
def test_a_dead_or_hung_peer_is_reported_within_the_timeout(store, tmp_path, how):
    port = free_port()
    args = ["train", "--store", str(store), "--out", str(tmp_path / "r"), "--max-steps",
            "100000", "--set", "n_concepts=256", "--set", "batch_images=8", "--no-progress"]
    procs = [_rank(r, port, args, USAE_DIST_TIMEOUT_S="5") for r in (0, 1)]
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    assert metrics.exists(), procs[0].communicate(timeout=5)
    procs[1].send_signal(signal.SIGKILL if how == "dead" else signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert time.monotonic() - t0 < 40
    assert procs[0].returncode == 2, err[-2000:]
    assert "a peer process died or stopped answering" in err


# ---- pieces, in one process -----------------------------------------------------------
def test_shards_of_a_batch_cover_it_once(make_arrays, tmp_path):
    arrays = make_arrays(n_images=24, tokens=2)
    sources = [ArraySource(arrays),
               StoreSource(store_from_arrays(tmp_path / "s", arrays, dtype="float32",
                                             splits=["train"] * 24))]
    for src in sources:
        whole = next(src.batches(8, 3, 1, 1))
        parts = [next(src.batches(8, 3, 1, 1, shard=(r, 4))) for r in range(4)]
        for m in src.models:
            np.testing.assert_array_equal(torch.cat([p[m] for p in parts]).float().numpy(),
                                          whole[m].float().numpy())
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_single_process_dist_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Dist.from_env()
    assert (d.rank, d.world, d.enabled, d.is_main, d.owns_group) == (0, 1, False, True, False)
    fired = torch.tensor([True, False])
    assert d.reduce_step([], fired, [1.0], False) == (fired, [1.0], False)
    assert d.device("cuda") == "cuda"
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    sync_batch_norms(bn)
    assert type(bn[0]) is GlobalBatchNorm1d
    x = torch.randn(16, 3)
    torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(
        x, None, None, bn[0].weight, bn[0].bias, training=True))
