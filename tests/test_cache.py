import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from usae.cache import cache
from usae.errors import UsaeError
from usae.store import Store

SPECS = "effnet:lite0?img_size=64,timm:vit_tiny_patch16_224?img_size=64&pretrained=0"


def make_images(root, n=12, bad=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "val" if i % 4 == 0 else "train"
        path = root / split / f"class{i % 2}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60 + i, 90, 3), dtype=np.uint8)).save(path)
    if bad:
        (root / "train" / "class0" / "broken.jpg").write_bytes(b"not a jpeg")
        (root / "train" / "class0" / "readme.txt").write_text("ignored")
    return root


def test_cache_end_to_end(tmp_path):
    make_images(tmp_path / "imgs")
    manifest = cache(SPECS, tmp_path / "imgs", tmp_path / "store", batch_size=4, workers=0,
                     progress=False)
    store = Store(tmp_path / "store")
    info = store.info()
    assert info["models"] == {"effnet_lite0": {"d": 320, "tokens": 4},
                              "vit_tiny_patch16_224": {"d": 192, "tokens": 4}}
    assert info["n_images"] == 12 and info["splits"] == {"train": 9, "val": 3}
    broken = [i for i in manifest["images"] if i.get("skipped")]
    assert len(broken) == 1 and broken[0]["path"].endswith("broken.jpg")
    assert "UnidentifiedImageError" in broken[0]["skipped"]
    assert {i["label"] for i in manifest["images"]} == {"class0", "class1"}
    vit = manifest["models"]["vit_tiny_patch16_224"]
    assert vit["grid"] == [4, 4] and vit["aligned_grid"] == [2, 2] and vit["prefix_tokens"] == 1
    stats = store.stats()["effnet_lite0"]
    assert stats.std > 0 and stats.mean_d.shape == (320,)
    x = store.read("effnet_lite0", store.rows("train"))
    assert x.shape == (9, 4, 320) and np.isfinite(x.numpy()).all()


def test_cache_refuses_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsaeError, match="no images"):
        cache(SPECS, tmp_path / "empty", tmp_path / "s1", progress=False)
    make_images(tmp_path / "imgs", n=3, bad=False)
    with pytest.raises(UsaeError, match="unknown kind"):
        cache("pytorch:resnet", tmp_path / "imgs", tmp_path / "s2", progress=False)


def test_rerun_on_a_finished_store_is_refused(tmp_path):
    make_images(tmp_path / "imgs", n=4, bad=False)
    cache(SPECS, tmp_path / "imgs", tmp_path / "store", workers=0, progress=False)
    with pytest.raises(UsaeError, match="finalized"):
        cache(SPECS, tmp_path / "imgs", tmp_path / "store", workers=0, progress=False)


@pytest.mark.slow
def test_killed_cache_resumes_without_losing_or_duplicating(tmp_path):
    make_images(tmp_path / "imgs", n=40)
    cmd = [sys.executable, "-m", "usae.cli", "cache", "--models", SPECS, "--images",
           str(tmp_path / "imgs"), "--batch-size", "2", "--workers", "1", "--dtype", "float32"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "part")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    progress = tmp_path / "part" / "progress.safetensors"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(progress), "pt") as fh:
                    done = int(fh.metadata()["done"])
            except Exception:  # noqa: BLE001 - mid-rename
                pass
            if done >= 6:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= done < 41, "the kill should land mid-run"
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert manifest["state"] == "building"
    res = subprocess.run(cmd + ["--out", str(tmp_path / "part")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    full, part = Store(tmp_path / "full"), Store(tmp_path / "part")
    assert full.manifest["images"] == part.manifest["images"]
    for m in full.models:
        assert np.array_equal(np.asarray(full.array(m)), np.asarray(part.array(m)))
    assert part.info()["n_images"] == 40 and part.info()["skipped"] == 1
