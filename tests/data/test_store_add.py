"""`usae store add-model`: a finished store gains a model for exactly its images, equal to a
store cached with every model at once, and nothing of the old models changes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import prebuilt, stop_after_commits
from tests.data.test_cache import make_images
from usae.cli import main
from usae.data import store_add
from usae.data.cache import cache
from usae.errors import UsaeError
from usae.store.store import Store, acts_file, earlier_hashes, read_manifest

OLD = "effnet:lite0?img_size=64&name=a"
NEW = "effnet:lite1?img_size=64&name=b"
KW = dict(batch_size=4, workers=0, dtype="float32", progress=False)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Images, and the oracle: one store cached from them with both models at once (no
    add-model code runs here, so mutation testing builds it once). A store records its
    images' absolute paths, so ``images_root.txt`` says where they were when it was cached."""
    root = tmp_path_factory.mktemp("add")

    def build(dest):
        make_images(dest / "imgs", n=10)
        cache(f"{OLD},{NEW}", dest / "imgs", dest / "store", **KW)
        (dest / "images_root.txt").write_text(str(dest / "imgs"))

    prebuilt("store-add-together", root, build)
    return root


@pytest.fixture(scope="module")
def images(prepared):
    return Path((prepared / "images_root.txt").read_text())


@pytest.fixture(scope="module")
def together(prepared):
    return prepared / "store"


def test_an_added_model_equals_a_cache_of_every_model_at_once(images, together, tmp_path):
    cache(OLD, images, tmp_path / "s", **KW)
    before = digest(acts_file(tmp_path / "s", "a"))
    old = read_manifest(tmp_path / "s")
    assert main(["store", "add-model", str(tmp_path / "s"), "--models", NEW, "--workers", "0",
                 "--batch-size", "4", "--no-progress"]) == 0
    new, both = read_manifest(tmp_path / "s"), read_manifest(together)
    assert digest(acts_file(tmp_path / "s", "a")) == before, "the old model's bytes changed"
    assert digest(acts_file(tmp_path / "s", "b")) == digest(acts_file(together, "b"))
    assert list(new["models"]) == ["a", "b"] and new["models"] == both["models"]
    assert new["images"] == both["images"] and new["stats"] == both["stats"]
    assert new["history"][0]["added"] == ["b"]
    assert new["history"][0]["previous_content_hash"] == old["content_hash"]
    assert new["content_hash"] != old["content_hash"] and Store(tmp_path / "s").verify()
    assert earlier_hashes(new) == {old["content_hash"]}
    assert not list((tmp_path / "s").glob(".add-*")), "the staging store is removed"


def test_refusals_are_one_line(images, together, tmp_path, capsys):
    cache(OLD, images, tmp_path / "s", **KW)
    with pytest.raises(UsaeError, match=r"already has model\(s\) \['a'\]"):
        store_add.add_models(tmp_path / "s", "effnet:lite2?img_size=64&name=a", workers=0)
    # lite0 at 32 px has a 1x1 grid: it cannot give the store's 2x2
    with pytest.raises(UsaeError, match=r"cannot give the store's \[2, 2\]"):
        store_add.add_models(tmp_path / "s", "effnet:lite0?img_size=32&name=c", workers=0)
    assert main(["store", "add-model", str(tmp_path / "nothing"), "--models", NEW]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_stop_during_extraction_or_the_join_resumes_to_the_same_store(
        images, together, tmp_path, monkeypatch):
    cache(OLD, images, tmp_path / "s", **KW)
    restore = stop_after_commits(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        store_add.add_models(tmp_path / "s", NEW, batch_size=4, workers=0, progress=False)
    restore()
    assert list(read_manifest(tmp_path / "s")["models"]) == ["a"], "the store is unchanged"
    assert Store(tmp_path / "s").verify()
    # now a stop inside the join, after the arrays moved and before the manifest
    real_write = store_add.atomic_write_json
    monkeypatch.setattr(store_add, "atomic_write_json",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store_add.add_models(tmp_path / "s", NEW, batch_size=4, workers=0, progress=False)
    assert list(read_manifest(tmp_path / "s")["models"]) == ["a"]
    monkeypatch.setattr(store_add, "atomic_write_json", real_write)
    store_add.add_models(tmp_path / "s", NEW, batch_size=4, workers=0, progress=False)
    assert digest(acts_file(tmp_path / "s", "b")) == digest(acts_file(together, "b"))
    assert read_manifest(tmp_path / "s")["stats"] == read_manifest(together)["stats"]


def test_kill_9_during_add_model_then_the_same_command_finishes_it(images, tmp_path):
    """The same command, killed once and re-run, writes what it writes uninterrupted (both
    run as subprocesses with one thread, so the bytes compare exactly)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(store):
        return [sys.executable, "-m", "usae", "store", "add-model", str(store), "--models", NEW,
                "--workers", "0", "--batch-size", "4", "--no-progress"]

    for name in ("s", "whole"):
        cache(OLD, images, tmp_path / name, **KW)
    assert subprocess.run(command(tmp_path / "whole"), env=env, timeout=300).returncode == 0
    proc = subprocess.Popen(command(tmp_path / "s"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    staging = tmp_path / "s" / ".add-b"
    for _ in range(1200):  # until the staging store has its progress file
        if (staging / "progress.safetensors").exists() or proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    res = subprocess.run(command(tmp_path / "s"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert digest(acts_file(tmp_path / "s", "b")) == digest(acts_file(tmp_path / "whole", "b"))
    assert read_manifest(tmp_path / "s")["stats"] == read_manifest(tmp_path / "whole")["stats"]
    assert np.isfinite(Store(tmp_path / "s").read("b", np.arange(3)).numpy()).all()


def test_store_model_is_the_manifest_entry_typed(together):
    store = Store(together)
    for name, raw in read_manifest(together)["models"].items():
        entry = store.model(name)
        assert (entry.name, entry.d, entry.tokens) == (name, raw["d"], raw["tokens"])
        assert entry.as_manifest() == raw and "d" not in entry.info
    with pytest.raises(UsaeError, match="no model 'zzz'"):
        store.model("zzz")


def test_an_image_changed_since_the_cache_is_refused_every_time(images, tmp_path):
    """A file the store read that is broken now: the staged model would skip it, so the
    join is refused, and a re-run is refused again (the finished staging store is never
    joined unchecked)."""
    import shutil

    shutil.copytree(images, tmp_path / "imgs")
    cache(OLD, tmp_path / "imgs", tmp_path / "s", **KW)
    victim = next(p for p in sorted((tmp_path / "imgs").rglob("*.jpg")))
    victim.write_bytes(b"not a jpeg any more")
    for _ in range(2):
        with pytest.raises(UsaeError, match="was read when the store was cached"):
            store_add.add_models(tmp_path / "s", NEW, batch_size=4, workers=0, progress=False)
    assert list(read_manifest(tmp_path / "s")["models"]) == ["a"]
    assert not (tmp_path / "s" / "acts_b.bin").exists()


def test_a_pending_join_is_finished_before_another_model_is_added(images, tmp_path,
                                                                    monkeypatch):
    """A stop inside the join of model b, then a command adding model c: b is joined first,
    then c is added (neither is lost)."""
    cache(OLD, images, tmp_path / "s", **KW)
    monkeypatch.setattr(store_add, "atomic_write_json",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store_add.add_models(tmp_path / "s", NEW, batch_size=4, workers=0, progress=False)
    monkeypatch.undo()
    third = "effnet:lite2?img_size=64&name=c"
    manifest = store_add.add_models(tmp_path / "s", third, batch_size=4, workers=0,
                                    progress=False)
    assert list(manifest["models"]) == ["a", "b", "c"] and Store(tmp_path / "s").verify()
    assert [h["added"] for h in manifest["history"]] == [["b"], ["c"]]
