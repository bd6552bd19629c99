import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usae.align import align_tokens
from usae.backbones import build_backbones, expand_specs
from usae.backbones.base import Preprocess
from usae.cache import cache
from usae.errors import UsaeError
from usae.images import load_rgb, normalize, preprocess_image, resize_crop
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


def test_every_stored_row_is_its_own_images_backbone_output(tmp_path):
    """Guards which image each row belongs to: a broken file in the *middle* of a batch must
    not shift the rows after it, and each model's row is that model's output for that image."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(3)
    root.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (50 + 3 * i, 70, 3), dtype=np.uint8)).save(
            root / f"{i:02d}.png")
    (root / "03_broken.png").write_bytes(b"\x89PNG broken")  # sorts into the first batch
    cache(SPECS, root, tmp_path / "store", batch_size=4, workers=0, progress=False)
    store = Store(tmp_path / "store")
    images = store.manifest["images"]
    assert [Path(i["path"]).name for i in images].index("03_broken.png") == 4
    backbones, target = build_backbones(expand_specs(SPECS))
    for row, img in enumerate(images):
        if img.get("skipped"):
            assert row == 4
            continue
        for b in backbones:
            px = preprocess_image(load_rgb(img["path"]), b.preprocess)[None]
            want = align_tokens(b.extract(px), b.n_prefix, b.grid, target)[0]
            got = store.read(b.name, np.array([row]))[0]
            torch.testing.assert_close(got, want.half().float(), rtol=2e-3, atol=2e-3)


def test_normalize_and_resize_crop_give_hand_computed_values():
    """Guards the preprocessing every model declares (resize the short side, centre crop,
    scale to [0, 1], normalize), on values worked out by hand."""
    p = Preprocess(crop=(4, 4), resize=4, interpolation="nearest", mean=(0.5, 0.4, 0.3),
                   std=(0.5, 0.2, 0.1))
    x = torch.full((3, 2, 2), 0.5)
    out = normalize(x, p)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.0, 0.5, 2.0]))
    # an 8x4 image whose red channel is the column index: short side 4 = resize, so no
    # scaling; the 4-wide centre crop keeps columns 2..5
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[..., 0] = np.arange(8)[None, :]
    arr[..., 1] = np.arange(4)[:, None] * 10
    crop = resize_crop(Image.fromarray(arr), p)
    assert crop.shape == (3, 4, 4)
    torch.testing.assert_close(crop[0, 0], torch.tensor([2.0, 3.0, 4.0, 5.0]) / 255)
    torch.testing.assert_close(crop[1, :, 0], torch.tensor([0.0, 10.0, 20.0, 30.0]) / 255)
    # a 2x larger image is halved first (nearest), then cropped the same way
    big = np.repeat(np.repeat(arr, 2, axis=0), 2, axis=1)
    torch.testing.assert_close(resize_crop(Image.fromarray(big), p), crop)


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_decoded_batches_keep_order_and_match_per_image_preprocessing(tmp_path, threads):
    """Guards the threaded decoder: batches come back in plan order, each image's pixels equal
    ``preprocess_image`` on it (uint8 resize shared by models of one geometry, normalization
    per model in the batch), bad files carry their reason, and no more than two batches are
    decoded ahead of the consumer."""
    import threading

    from usae.backbones.base import Preprocess
    from usae.decode import ImageDataset, batch_pixels, decoded_batches
    from usae.images import list_images, load_rgb, preprocess_image

    make_images(tmp_path)
    paths = [e["path"] for e in list_images(tmp_path)]
    pre = {"a": Preprocess(crop=(16, 16), resize=18, interpolation="bicubic",
                           mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)),
           "b": Preprocess(crop=(16, 16), resize=18, interpolation="bicubic")}
    seen, lock = [], threading.Lock()

    class Counting(ImageDataset):
        def __getitem__(self, i):
            with lock:
                seen.append(i)
            return super().__getitem__(i)

    plan = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9, 10], [11, 12]]
    batches = decoded_batches(Counting(paths, pre), iter(plan), threads)
    first = next(batches)
    assert len(seen) <= 9, "decoded more than two batches ahead"
    got = [first, *batches]
    assert [[i for i, _, _ in items] for items in got] == plan
    backbones = [type("B", (), {"name": m, "preprocess": p})() for m, p in pre.items()]
    for items in got:
        ok = [i for i, px, _ in items if px is not None]
        pixels = batch_pixels(items, backbones)
        for m, p in pre.items():
            want = torch.stack([preprocess_image(load_rgb(paths[i]), p) for i in ok])
            assert torch.equal(pixels[m], want)
    reasons = {i: r for items in got for i, _, r in items if r}
    assert [paths[i].endswith("broken.jpg") for i in reasons] == [True]


VIT = next(s for s in SPECS.split(",") if "vit" in s)


def test_cache_reports_its_work_and_keeps_cls_rows(tmp_path, caplog, capsys):
    """Guards what `usae cache` records and reports beyond the rows: the manifest's source and
    alignment, keep_cls (one more row per image, first the CLS token, and a skipped image's
    zero rows of that shape), the seeded split, the timings, the summary and skip lines in the
    log, and the progress bar (label, unit, count)."""
    from usae.images import list_images

    make_images(tmp_path / "imgs", n=6)
    timings: dict = {}
    with caplog.at_level("INFO"):
        manifest = cache(VIT, tmp_path / "imgs", tmp_path / "store", batch_size=3,
                         workers=1, keep_cls=True, seed=3, val_fraction=0.5, progress=True,
                         timings=timings)
    err = capsys.readouterr().err
    assert "cache: 100%" in err and "7/7" in err and "img/s" in err
    assert manifest["source"] == str((tmp_path / "imgs").resolve())
    assert manifest["align"] == "resample"
    expected = list_images(tmp_path / "imgs", val_fraction=0.5, seed=3)
    assert [i["split"] for i in manifest["images"]] == [e["split"] for e in expected]
    store = Store(tmp_path / "store")
    assert store.tokens == 4 * 4 + 1 and manifest["models"]["vit_tiny_patch16_224"]["keep_cls"]
    assert set(timings) == {"seconds", "images_per_s", "forward_seconds"}
    assert 0 < timings["forward_seconds"] <= timings["seconds"]
    assert timings["images_per_s"] == pytest.approx(7 / timings["seconds"], rel=1e-6)
    broken = next(i for i, e in enumerate(manifest["images"]) if e.get("skipped"))
    assert not store.array("vit_tiny_patch16_224")[broken].any()
    names = ", ".join(manifest["models"])
    assert (f"stored 6 images (1 skipped) for {names} in {timings['seconds']:.1f}s "
            f"({timings['images_per_s']:.1f} images/s) -> {tmp_path / 'store'}") in caplog.text
    path = manifest["images"][broken]["path"]
    assert f"skipping {path}: UnidentifiedImageError" in caplog.text
