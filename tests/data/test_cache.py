import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import stop_after_commits
from usae.data import cache as cache_module
from usae.data.align import align_tokens
from usae.data.backbones import build_backbones, expand_specs
from usae.data.backbones.base import Preprocess
from usae.data.cache import cache
from usae.data.images import load_rgb, normalize, preprocess_image, resize_crop
from usae.distributed import Dist
from usae.errors import UsaeError
from usae.store import writer as store_writer
from usae.store.store import Store, read_manifest

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


def test_cache_end_to_end(tmp_path, caplog):
    make_images(tmp_path / "imgs")
    with caplog.at_level("INFO"):
        manifest = cache(SPECS, tmp_path / "imgs", tmp_path / "store", batch_size=4,
                         workers=0, progress=False)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stored")]
    assert summary[0].startswith("stored 12 images (1 skipped) for effnet_lite0, "
                                 "vit_tiny_patch16_224 in ")
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

    from usae.data.backbones.base import Preprocess
    from usae.data.image_decoding import ImageDataset, batch_pixels, decoded_batches
    from usae.data.images import list_images, load_rgb, preprocess_image

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
    from usae.data.images import list_images

    make_images(tmp_path / "split", n=6)
    for path in (tmp_path / "split").glob("*/*/*"):  # no split folders: --val-fraction splits
        (tmp_path / "imgs" / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(tmp_path / "imgs" / path.parent.name / path.name)
    timings: dict = {}
    with caplog.at_level("INFO"):
        manifest = cache(VIT, tmp_path / "imgs", tmp_path / "store", batch_size=3,
                         workers=1, keep_cls=True, split_seed=3, val_fraction=0.5, progress=True,
                         timings=timings)
    err = capsys.readouterr().err
    assert "cache: 100%" in err and "7/7" in err and "img/s" in err
    assert manifest["source"] == str((tmp_path / "imgs").resolve())
    assert manifest["align"] == "resample"
    splits = [i["split"] for i in manifest["images"]]
    assert splits == [e["split"] for e in list_images(tmp_path / "imgs", val_fraction=0.5,
                                                       seed=3)]
    for other in ({"val_fraction": 0.1, "seed": 3}, {"val_fraction": 0.5, "seed": 0}):
        assert splits != [e["split"] for e in list_images(tmp_path / "imgs", **other)]
    store = Store(tmp_path / "store")
    assert store.tokens == 4 * 4 + 1 and manifest["models"]["vit_tiny_patch16_224"]["keep_cls"]
    assert set(timings) == {"seconds", "images_per_s", "forward_seconds"}
    assert 0 < timings["forward_seconds"] <= timings["seconds"]
    assert timings["images_per_s"] == pytest.approx(7 / timings["seconds"], rel=1e-6)
    broken = next(i for i, e in enumerate(manifest["images"]) if e.get("skipped"))
    assert not store.array("vit_tiny_patch16_224")[broken].any()
    names = ", ".join(manifest["models"])
    messages = [r.getMessage() for r in caplog.records]  # whole messages
    assert (f"stored 6 images (1 skipped) for {names} in {timings['seconds']:.1f}s "
            f"({timings['images_per_s']:.1f} images/s) -> {tmp_path / 'store'}") in messages
    path = manifest["images"][broken]["path"]
    assert any(m.startswith(f"skipping {path}: UnidentifiedImageError") for m in messages)


@dataclass(frozen=True)
class ThreadDist(Dist):
    """A rank of an in-process job: ranks are threads, `barrier` is a `threading.Barrier` and
    `agree` records what it was given (the real collectives are tested under torchrun in
    test_distributed.py; this runs the cache's rank logic fast, in one process)."""

    sync: Any = None
    calls: Any = None  # list of (method, args)

    def barrier(self) -> None:
        self.calls.append(("barrier", ()))
        if self.enabled:
            self.sync.wait(timeout=60)

    def agree(self, what: str, text: str) -> None:
        self.calls.append(("agree", (what, text)))

    def device(self, device: str) -> str:
        self.calls.append(("device", (device,)))
        return "cpu"

    def close(self) -> None:
        self.calls.append(("close", ()))


def _run_ranks(world: int, fn, monkeypatch) -> list:
    """`fn(dist)` in one thread per rank; returns each rank's (dist, result) and re-raises a
    failure. A rank left waiting for ranks that have all returned fails at once instead of
    hanging: a rank that returns breaks the barrier, and writer 0's wait for the other parts
    gives up when no other rank is still running."""
    sync = threading.Barrier(world)
    dists = [ThreadDist(rank=r, world=world, sync=sync, calls=[]) for r in range(world)]
    out: list = [None] * world
    errors: list = []
    threads: list = []
    real_wait = store_writer.wait_for_parts

    def wait_while_others_run(path, n) -> None:
        failed: list = []

        def wait() -> None:
            try:
                real_wait(path, n, 0.02)
            except BaseException as e:  # noqa: BLE001 - re-raised in the rank's thread
                failed.append(e)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        while waiter.is_alive():
            waiter.join(0.05)
            others = [t for t in threads if t is not threading.current_thread()]
            if not any(t.is_alive() for t in others):
                waiter.join(0.5)  # one last poll after the others' final commits
                if waiter.is_alive():
                    raise AssertionError("waiting for parts no rank is writing")
        if failed:
            raise failed[0]

    monkeypatch.setattr(cache_module, "wait_for_parts", wait_while_others_run)

    def body(r: int) -> None:
        try:
            out[r] = fn(dists[r])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
        finally:
            sync.abort()  # every barrier of a finished rank has been passed by all

    threads.extend(threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True)
                   for r in range(world))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return [(d, o) for d, o in zip(dists, out)]


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = Store(a), Store(b)
    assert sa.manifest["images"] == sb.manifest["images"]
    assert sa.manifest["models"] == sb.manifest["models"]
    for m in sa.models:
        x, y = np.asarray(sa.array(m)), np.asarray(sb.array(m))
        assert x.dtype == y.dtype and np.array_equal(x, y), m
        for key, value in sa.stats()[m].to_json().items():  # float64 sums in another order
            np.testing.assert_allclose(value, sb.stats()[m].to_json()[key], rtol=1e-12)


@pytest.mark.parametrize("sharded", [False, True])
def test_two_ranks_write_the_same_rows_as_one_process(tmp_path, monkeypatch, sharded):
    """Guards the cache's rank logic: each rank opens the shared store (rank 0 first, the
    others after the barrier) for its own contiguous part, in the requested dtype, with the
    same manifest extras; or, with `shard_dir`, a store of its own whose `shard` block records
    its start and the hash of the agreed image list. Either way the result equals the store
    one process writes, and every rank agreed on the same image list first."""
    from usae.data.images import list_images
    from usae.store.merge import merge_shards

    _serial_builds(monkeypatch)
    imgs = make_images(tmp_path / "imgs", n=12)
    kw = dict(batch_size=4, workers=0, dtype="float32", progress=False)
    cache(VIT, imgs, tmp_path / "one", **kw)
    shards = tmp_path / "shards"
    ranks = _run_ranks(2, lambda d: cache(VIT, imgs, tmp_path / "two", dist=d,
                                          shard_dir=str(shards) if sharded else "", **kw),
                       monkeypatch)
    list_text = json.dumps([[e["path"], e.get("split")]
                            for e in list_images(imgs, val_fraction=0.1, seed=0)])
    for dist, _ in ranks:
        assert ("agree", ("image lists", list_text)) in dist.calls
        assert ("device", ("cpu",)) in dist.calls and ("close", ()) not in dist.calls
    if sharded:
        parts = sorted(shards.iterdir())
        assert [p.name for p in parts] == ["shard-00000-of-00002", "shard-00001-of-00002"]
        digest = hashlib.sha256(list_text.encode()).hexdigest()
        blocks = [read_manifest(p)["shard"] for p in parts]
        assert blocks == [{"index": r, "count": 2, "start": start, "n_total": 13,
                           "list_hash": digest} for r, start in ((0, 0), (1, 8))]
        merge_shards(parts, tmp_path / "two", progress=False)
        # a finished store is replaced only with force; a shard is never the output
        with pytest.raises(UsaeError, match="already holds a store — pass --force"):
            merge_shards(parts, tmp_path / "two", progress=False)
        for out in (parts[0], parts[0] / "inner", shards):
            with pytest.raises(UsaeError, match="overlaps the shard"):
                merge_shards(parts, out, force=True, progress=False)
        assert read_manifest(parts[0])["shard"]["index"] == 0
    else:
        assert ranks[1][0].calls.count(("barrier", ())) == 1
    _assert_same_store(tmp_path / "one", tmp_path / "two")
    assert read_manifest(tmp_path / "two")["source"] == str(imgs.resolve())


def test_cache_hands_its_options_to_each_stage(tmp_path, monkeypatch, capsys):
    """Guards the wiring of `cache`'s options: the options object itself (not only keyword
    changes), `pretrained` and `align` to the backbones, the device to the allocator setting,
    the torchrun job (joined from the environment with the device, and closed after) and to
    the backbones' `.to`, `workers` (0 stays 0; -1 asks the machine for the given device),
    and that the progress bar is on by default and off when asked (or on other ranks)."""
    from usae.options import CacheOptions

    seen: dict = {"to": [], "workers": [], "default_workers": [], "malloc": []}
    real_build = cache_module.build_backbones
    real_extraction = cache_module.run_extraction

    def build(specs, **kw):
        seen["build"] = kw
        backbones, target = real_build(specs, **kw)
        for b in backbones:
            real_to = b.to
            b.to = lambda device, real_to=real_to: (seen["to"].append(device), real_to(device))[1]
        return backbones, target

    def extraction(writer, backbones, target, paths, batch_size, workers, *a, **kw):
        seen["workers"].append(workers)
        return real_extraction(writer, backbones, target, paths, batch_size, workers, *a, **kw)

    own = ThreadDist(calls=[])
    monkeypatch.setattr(cache_module, "build_backbones", build)
    monkeypatch.setattr(cache_module, "run_extraction", extraction)
    monkeypatch.setattr(cache_module, "keep_freed_memory", seen["malloc"].append)
    import usae.options as options_module

    monkeypatch.setattr(options_module, "default_workers",
                        lambda device: (seen["default_workers"].append(device), 0)[1])
    monkeypatch.setattr(Dist, "from_env", classmethod(
        lambda cls, device: (own.calls.append(("from_env", (device,))), own)[1]))
    imgs = make_images(tmp_path / "imgs", n=3, bad=False)
    cache(VIT, imgs, tmp_path / "a", CacheOptions(workers=0, align="resize_input"),
          pretrained=False)
    assert seen["build"] == {"pretrained": False, "align": "resize_input"}
    assert read_manifest(tmp_path / "a")["align"] == "resize_input"
    assert seen["workers"] == [0] and seen["malloc"] == ["cpu"] and seen["to"] == ["cpu"]
    assert own.calls[0] == ("from_env", ("cpu",)) and own.calls[-1] == ("close", ())
    assert ("device", ("cpu",)) in own.calls
    assert "cache: 100%" in capsys.readouterr().err  # progress is on by default
    cache(VIT, imgs, tmp_path / "b", workers=-1, progress=False)
    assert seen["workers"] == [0, 0] and seen["default_workers"] == ["cpu"]
    assert "cache:" not in capsys.readouterr().err
    cache_module._cache(expand_specs(VIT), imgs, tmp_path / "d",
                        CacheOptions(workers=0), None, False, None, ThreadDist(calls=[]))
    assert "cache:" not in capsys.readouterr().err


def test_interrupted_cache_resumes_in_process_with_the_right_rows_and_counts(
        tmp_path, monkeypatch, caplog, capsys):
    """Guards resuming: the images after the last committed batch are decoded with their own
    row indices (not from row 0), the log says how many were already stored (and a fresh run
    says nothing of resuming), the bar starts at the stored count, and the store equals one
    written without interruption."""
    imgs = make_images(tmp_path / "imgs", n=12)
    kw = dict(batch_size=4, workers=0, dtype="float32")
    cache(VIT, imgs, tmp_path / "full", progress=False, **kw)
    restore = stop_after_commits(monkeypatch, 1)
    with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt):
        cache(VIT, imgs, tmp_path / "part", progress=False, **kw)
    assert "resuming" not in caplog.text
    restore()
    capsys.readouterr()
    with caplog.at_level("INFO"):
        cache(VIT, imgs, tmp_path / "part", progress=True, **kw)
    assert f"resuming {tmp_path / 'part'}: 4 of 13 images already stored" in \
        [r.getMessage() for r in caplog.records]
    err = capsys.readouterr().err
    assert "13/13" in err and " 0/13" not in err and "| 4/13" in err
    _assert_same_store(tmp_path / "full", tmp_path / "part")


def test_cache_timings_and_bar_postfix_are_measured(tmp_path, monkeypatch, capsys):
    """Guards the reported speed: `forward_seconds` adds up every batch's backbone time
    (each batch here takes at least 0.05 s), `seconds` is the loop's wall time (no more than
    the call's), and the bar's last postfix shows the images/s so far and the skip count."""
    import re

    real_extract = cache_module.extract_batch

    def slow_extract(*a, **k):
        time.sleep(0.05)
        return real_extract(*a, **k)

    monkeypatch.setattr(cache_module, "extract_batch", slow_extract)
    imgs = make_images(tmp_path / "imgs", n=12)
    timings: dict = {}
    t0 = time.perf_counter()
    cache(VIT, imgs, tmp_path / "s", batch_size=4, workers=0, timings=timings, progress=True)
    wall = time.perf_counter() - t0
    assert 4 * 0.05 <= timings["forward_seconds"] <= timings["seconds"] <= wall
    postfix = re.findall(r"img_s=([\d.]+), skipped=(\d+)", capsys.readouterr().err)
    img_s, skipped = postfix[-1]
    assert skipped == "1"
    assert float(img_s) == pytest.approx(timings["images_per_s"], rel=0.3)


def test_token_counts_use_both_sides_of_a_non_square_grid():
    """Guards rows per image on a non-square aligned grid (h * w, plus one with CLS)."""
    class Fake:
        name, d = "m", 5

        def info(self):
            return {}

    (entry,) = cache_module.model_entries([Fake()], (2, 3), keep_cls=False)
    assert entry.tokens == 6 and entry.info["aligned_grid"] == [2, 3]
    assert cache_module._shape(Fake(), (2, 3), True) == (7, 5)
    assert cache_module._shape(Fake(), (3, 2), False) == (6, 5)


def _serial_builds(monkeypatch) -> None:
    """Ranks as threads build their random-weight backbones one at a time (seeded through
    the global RNG)."""
    lock, real_build = threading.Lock(), cache_module.build_backbones

    def build(*a, **kw):
        with lock:
            return real_build(*a, **kw)

    monkeypatch.setattr(cache_module, "build_backbones", build)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_rank_resumes_its_own_part_and_a_finished_shard_is_left_alone(
        tmp_path, monkeypatch, caplog, sharded):
    """Guards resuming under torchrun: rank 1, stopped after its first batch (rows 8..12 of
    its 8..13), resumes at its own next image, in the shared store or in its shard (whose
    rows count from 0), and says how many of its own images were stored; rank 0, whose shard
    an earlier run finalized, leaves it alone instead of refusing the re-run. The result
    equals one process's store."""
    from usae.store.merge import merge_shards

    _serial_builds(monkeypatch)
    imgs = make_images(tmp_path / "imgs", n=12)
    kw = dict(batch_size=4, workers=0, dtype="float32", progress=False)
    cache(VIT, imgs, tmp_path / "one", **kw)
    shards = tmp_path / "shards"

    def job(dist):
        return cache(VIT, imgs, tmp_path / "two", dist=dist,
                     shard_dir=str(shards) if sharded else "", **kw)

    real_commit, rank1_commits = store_writer.StoreWriter.commit, []

    def commit(self, *a, **k):
        if threading.current_thread().name == "rank1":
            if len(rank1_commits) == 1:
                raise KeyboardInterrupt
            rank1_commits.append(1)
        return real_commit(self, *a, **k)

    monkeypatch.setattr(store_writer.StoreWriter, "commit", commit)
    with pytest.raises((KeyboardInterrupt, AssertionError)):
        _run_ranks(2, job, monkeypatch)
    monkeypatch.setattr(store_writer.StoreWriter, "commit", real_commit)
    with caplog.at_level("INFO"):
        _run_ranks(2, job, monkeypatch)
    messages = [r.getMessage() for r in caplog.records]
    where = shards / "shard-00001-of-00002" if sharded else tmp_path / "two"
    assert f"resuming {where}: 4 of 5 images already stored" in messages
    if sharded:
        assert f"{shards / 'shard-00000-of-00002'} is already complete" in messages
        merge_shards(sorted(shards.iterdir()), tmp_path / "two", progress=False)
    _assert_same_store(tmp_path / "one", tmp_path / "two")
