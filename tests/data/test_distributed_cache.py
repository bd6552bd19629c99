"""Caching under torchrun (gloo, 127.0.0.1): 2 ranks write the store 1 process writes, bit
for bit; the shard + merge path too; a killed rank resumes its own range."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import write_noise_images
from tests.sae.test_distributed import TORCHRUN, _env, free_port
from usae.cli import main
from usae.data.cache import cache
from usae.errors import UsaeError
from usae.store.merge import merge_shards
from usae.store.store import Store

SPEC = "effnet:lite0?pretrained=0&img_size=32&name=a,effnet:lite0?pretrained=0&img_size=32&name=b"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = write_noise_images(tmp_path_factory.mktemp("imgs"), 11, seed=0)
    (root / "05bad.png").write_bytes(b"not an image")
    return root


def cache_args(images, out, *extra):
    return ["cache", "--models", SPEC, "--images", str(images), "--out", str(out),
            "--batch-size", "2", "--workers", "0", "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def one_rank(images, tmp_path_factory):
    """The store one process writes (one thread, as each torchrun worker has)."""
    out = tmp_path_factory.mktemp("one") / "store"
    res = subprocess.run([sys.executable, "-m", "usae", *cache_args(images, out)],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    return Store(out)


def ranks(n, args, script=None):
    cmd = [*TORCHRUN, "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), *(["-m", "usae"] if script is None else [script]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


def assert_same_store(got: Store, want: Store):
    assert got.manifest["content_hash"] == want.manifest["content_hash"]
    assert got.manifest["images"] == want.manifest["images"]
    assert got.manifest["n_images"] == want.manifest["n_images"] == 11
    for m in want.models:
        assert (got.path / f"acts_{m}.bin").read_bytes() == (want.path / f"acts_{m}.bin").read_bytes()
        for key in ("mean_d", "std_d"):
            np.testing.assert_allclose(got.manifest["stats"][m][key],
                                       want.manifest["stats"][m][key], rtol=1e-9, atol=1e-15)
    assert not list(got.path.glob("progress*"))


def test_two_ranks_write_the_store_one_process_writes(images, one_rank, tmp_path):
    res = ranks(2, cache_args(images, tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1
    assert_same_store(Store(tmp_path / "two"), one_rank)


def test_shards_then_merge_equal_the_one_process_store(images, one_rank, tmp_path):
    res = ranks(2, cache_args(images, tmp_path / "unused", "--shard-dir", str(tmp_path / "sh")))
    assert res.returncode == 0, res.stderr[-3000:]
    shards = sorted((tmp_path / "sh").iterdir())
    assert [s.name for s in shards] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert not (tmp_path / "unused").exists()
    assert main(["store", "merge", *map(str, shards[::-1]), "--out", str(tmp_path / "m")]) == 0
    assert_same_store(Store(tmp_path / "m"), one_rank)
    assert Store(tmp_path / "m").verify()
    with pytest.raises(UsaeError, match="got indices \\[0\\]"):
        merge_shards(shards[:1], tmp_path / "m2")
    with pytest.raises(UsaeError, match="not a shard"):
        merge_shards([one_rank.path], tmp_path / "m3")


def test_a_killed_rank_resumes_its_own_range(images, one_rank, tmp_path):
    wrapper = tmp_path / "killer.py"
    wrapper.write_text(textwrap.dedent("""
        import os, sys
        from usae.store import writer as store_writer
        real = store_writer.StoreWriter.commit
        calls = [0]
        def commit(self, *a, **kw):
            real(self, *a, **kw)
            calls[0] += 1
            if os.environ["RANK"] == "1" and calls[0] == 2:
                os._exit(9)  # killed after its second batch
        store_writer.StoreWriter.commit = commit
        from usae.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "two"
    first = ranks(2, cache_args(images, out), script=str(wrapper))
    assert first.returncode != 0
    assert {p.name for p in out.glob("progress*")} == {"progress.rank0of2.safetensors",
                                                       "progress.rank1of2.safetensors"}
    with pytest.raises(UsaeError, match="different number of processes"):
        cache(SPEC, images, out, batch_size=2, workers=0, dtype="float32", progress=False)
    again = ranks(2, cache_args(images, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    assert_same_store(Store(out), one_rank)


def test_two_ranks_add_a_model_as_one_process_caches_both(images, one_rank, tmp_path):
    """`store add-model` under torchrun: the ranks share the extraction, the main rank joins,
    and the store equals one cached with both models at once (one line printed)."""
    spec_a, spec_b = SPEC.split(",")
    res = subprocess.run([sys.executable, "-m", "usae", "cache", "--models", spec_a,
                          "--images", str(images), "--out", str(tmp_path / "s"),
                          "--batch-size", "2", "--workers", "0", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    res = ranks(2, ["store", "add-model", str(tmp_path / "s"), "--models", spec_b,
                    "--batch-size", "2", "--workers", "0", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(f"{tmp_path / 's'}: models ['a', 'b'], 11 images") == 1
    added = Store(tmp_path / "s")
    assert added.manifest["history"][0]["added"] == ["b"]
    assert_same_store(added, one_rank)
    assert added.verify() and not list((tmp_path / "s").glob(".add-*"))
