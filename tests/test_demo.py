"""``usae demo`` in process (usae.demo): the crops it makes from the bundled photos, and the
order, inputs and resume rules of its stages. The stages themselves are replaced by
recorders here (the quick demo in tests/test_cli.py runs them for real, in a subprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from usae import demo
from usae.config import DEMO_DATA
from usae.errors import ConfigMismatch, UsaeError
from usae.store.writer import store_from_arrays


def test_bundled_photos_are_real_rgb_or_grey_uint8_images():
    photos = demo.bundled_photos()
    assert len(photos) >= 4 and {"china", "flower", "grace_hopper"} <= set(photos)
    for name, img in photos.items():
        assert img.dtype == np.uint8 and img.ndim in (2, 3), name
        assert min(img.shape[:2]) >= 64, name


def test_too_few_photos_say_what_to_install(monkeypatch):
    import sys

    for module in ("skimage.data", "sklearn.datasets", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UsaeError, match=r"^the demo needs the photos bundled in scikit-image,"
                                        r" scikit-learn and matplotlib: `pip install "
                                        r"usae\[demo\]`$"):
        demo.bundled_photos()


def test_crops_are_seeded_scaled_and_split(tmp_path, monkeypatch):
    photos = {"a": np.full((300, 500, 3), 10, np.uint8), "b": np.full((420, 380), 200, np.uint8)}
    monkeypatch.setattr(demo, "bundled_photos", lambda: photos)
    assert demo.make_crops(tmp_path / "x", 20, seed=3, val_fraction=0.25) == 20
    demo.make_crops(tmp_path / "y", 20, seed=3, val_fraction=0.25)
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*.jpg"))
    assert files == sorted(p.relative_to(tmp_path / "y") for p in (tmp_path / "y").rglob("*.jpg"))
    assert len(files) == 20
    assert {f.parts[0] for f in files} == {"train", "val"}  # some of each at 25 %
    assert sorted(int(f.stem) for f in files) == list(range(20))
    for f in files:
        assert f.parts[1] == ("a" if int(f.stem) % 2 == 0 else "b")  # photos in turn
        with Image.open(tmp_path / "x" / f) as img:
            assert img.mode == "RGB" and 256 <= min(img.size) < 400
            assert max(img.size) <= min(img.size) * 4 / 3 * 1.02 + 1  # aspect 3/4 .. 4/3
    other = demo.make_crops(tmp_path / "z", 20, seed=4, val_fraction=0.25)
    assert other == 20
    sizes = [Image.open(tmp_path / "x" / f).size for f in files]
    assert sizes != [Image.open(next((tmp_path / "z").rglob(f.name))).size for f in files]


class Stages:
    """Recorders in place of the demo's stages; ``cache`` writes a real (tiny) store."""

    def __init__(self, make_arrays):
        self.calls: list[tuple] = []
        self.arrays = make_arrays(n_images=12, tokens=2)
        self.mismatch_once = False

    def cache(self, models, images, store_dir, batch_size, progress):
        self.args = getattr(self, "args", [])
        self.args.append(("cache", store_dir, progress))
        self.calls.append(("cache", models, images.name, batch_size))
        store_from_arrays(store_dir, self.arrays, splits=["train"] * 10 + ["val"] * 2)

    def train_run(self, cfg, source, run, **kw):
        resume = kw.get("resume", False)
        self.args.append(("train", run, kw["progress"], kw["store_manifest"]))
        self.calls.append(("train", cfg, source.split, resume, kw["force"]))
        if self.mismatch_once and resume:
            self.mismatch_once = False
            raise ConfigMismatch("changed")
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoint.safetensors").write_text("")

    def evaluate(self, run, store_dir, out, progress):
        self.args.append(("eval", run, store_dir, progress))
        self.calls.append(("eval", out.name))
        return type("R", (), {"r2": [[1.0]], "faithfulness": {"f": 1}})()

    def run_cam(self, run, store_dir, top, eval_dir, options, progress):
        self.args.append(("cam", run, store_dir, progress))
        self.calls.append(("cam", top, eval_dir.name, options.steps, options.size))
        return {"5": {}}

    def build_explorer(self, run, store_dir, out, eval_dir, progress):
        self.args.append(("explore", run, store_dir, progress))
        self.calls.append(("explore", out.name, eval_dir.name))

    def crops(self, out, n_images):
        self.args = getattr(self, "args", [])
        self.args.append(("crops", out.name))
        self.calls.append(("crops", n_images))
        (out / "train" / "p").mkdir(parents=True)


@pytest.fixture
def stages(monkeypatch, make_arrays):
    s = Stages(make_arrays)
    for name in ("cache", "train_run", "evaluate", "run_cam", "build_explorer"):
        monkeypatch.setattr(demo, name, getattr(s, name))
    monkeypatch.setattr(demo, "make_crops", s.crops)
    return s


def test_the_demo_runs_its_six_stages_in_order(tmp_path, stages):
    res = demo.run_demo(tmp_path / "d", n_images=100, progress=False)
    kinds = [c[0] for c in stages.calls]
    assert kinds == ["crops", "cache", "train", "eval", "cam", "explore"]
    assert stages.calls[0] == ("crops", 100)
    assert stages.calls[1] == ("cache", "demo", "images", 16)
    _, cfg, split, resume, force = stages.calls[2]
    assert split == "train" and resume is False and force is True
    assert cfg.preset == "fast" and cfg.train.epochs == 60 and cfg.train.max_steps == 0
    for key, value in DEMO_DATA.items():
        assert {**cfg.to_json()["sae"], **cfg.to_json()["train"]}[key] == value
    assert cfg.train.log_every == 20 and cfg.train.checkpoint_every == 500
    assert stages.calls[3:] == [("eval", "eval"), ("cam", 3, "eval", 64, 224),
                                ("explore", "explorer", "eval")]
    assert res["report"] == tmp_path / "d" / "eval" / "report.json"
    assert res["r2"] == [[1.0]] and res["faithfulness"] == {"f": 1}
    assert res["cam"] == {"5": {}} and res["explorer"] == tmp_path / "d" / "explorer" / \
        "index.html"
    assert res["out"] == str(tmp_path / "d")
    t = res["timings"]
    assert set(t) == {"images_s", "cache_s", "train_s", "total_s"}
    assert all(v >= 0 for v in t.values()) and t["total_s"] >= t["train_s"]
    assert (tmp_path / "d" / "images").is_dir() and not (tmp_path / "d" / "images.partial"
                                                         ).exists()


def test_quick_is_small_and_steps_are_kept(tmp_path, stages):
    demo.run_demo(tmp_path / "d", n_images=320, quick=True, progress=False, models="m1,m2")
    assert stages.calls[0] == ("crops", 48)
    assert stages.calls[1][1] == "m1,m2"
    cfg = stages.calls[2][1]
    assert cfg.train.max_steps == 40 and cfg.sae.n_concepts == 256
    assert cfg.train.batch_images == 4
    assert stages.calls[4] == ("cam", 1, "eval", 4, 64)
    stages.calls.clear()
    demo.run_demo(tmp_path / "e", n_images=10, steps=7, quick=True, progress=False)
    assert stages.calls[0] == ("crops", 10) and stages.calls[2][1].train.max_steps == 7
    stages.calls.clear()
    demo.run_demo(tmp_path / "f", steps=9, progress=False)
    assert stages.calls[2][1].train.max_steps == 9
    assert stages.calls[2][1].sae.n_concepts == DEMO_DATA["n_concepts"]


def test_a_rerun_reuses_finished_stages_and_resumes_training(tmp_path, stages):
    demo.run_demo(tmp_path / "d", progress=False)
    stages.calls.clear()
    demo.run_demo(tmp_path / "d", progress=False)
    kinds = [c[0] for c in stages.calls]
    assert kinds == ["train", "eval", "cam", "explore"]  # images and store are kept
    assert stages.calls[0][3:] == (True, False)  # resume, no force


def test_an_unfinished_store_is_cached_again(tmp_path, stages):
    demo.run_demo(tmp_path / "d", progress=False)
    manifest = tmp_path / "d" / "store" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "state": "partial"}))
    stages.calls.clear()
    demo.run_demo(tmp_path / "d", progress=False)
    assert [c[0] for c in stages.calls][:2] == ["cache", "train"]


def test_changed_demo_settings_train_the_run_again(tmp_path, stages, caplog):
    demo.run_demo(tmp_path / "d", progress=False)
    stages.calls.clear()
    stages.mismatch_once = True
    with caplog.at_level("INFO", logger="usae.demo"):
        demo.run_demo(tmp_path / "d", progress=False)
    trains = [c for c in stages.calls if c[0] == "train"]
    assert [c[3:] for c in trains] == [(True, False), (False, True)]  # resume, then afresh
    assert f"the demo's settings changed: training {tmp_path / 'd' / 'run'} again" in \
        caplog.messages


def test_a_mismatch_without_a_resume_is_raised(tmp_path, stages, monkeypatch):
    def always(cfg, source, run, **kw):
        raise ConfigMismatch("not a resume")

    monkeypatch.setattr(demo, "train_run", always)
    with pytest.raises(ConfigMismatch, match="not a resume"):
        demo.run_demo(tmp_path / "d", progress=False)


def test_leftover_partial_crops_are_replaced(tmp_path, stages):
    (tmp_path / "d" / "images.partial" / "junk").mkdir(parents=True)
    demo.run_demo(tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "images" / "junk").exists()
    assert (tmp_path / "d" / "images" / "train" / "p").is_dir()


def test_each_stage_gets_the_run_the_store_and_the_progress_flag(tmp_path, stages, caplog):
    import time

    out = tmp_path / "d"
    before = time.perf_counter()
    with caplog.at_level("INFO", logger="usae.demo"):
        res = demo.run_demo(out)  # the defaults: 320 crops, bars shown
    wall = time.perf_counter() - before
    store, run = out / "store", out / "run"
    manifest = json.loads((store / "manifest.json").read_text())
    assert stages.calls[0] == ("crops", 320)
    assert stages.args == [("crops", "images.partial"), ("cache", store, True),
                           ("train", run, True, manifest), ("eval", run, store, True),
                           ("cam", run, store, True), ("explore", run, store, True)]
    preset = stages.calls[2][1].preset
    assert caplog.messages == [
        f"[1/6] making 320 crops of bundled photos in {out / 'images'}",
        f"[2/6] caching activations of demo -> {store}",
        f"[3/6] training a universal SAE ({preset}) -> {run}",
        f"[4/6] evaluating on the held-out crops -> {out / 'eval'}",
        f"[5/6] coordinated activation maximization, top 3 concepts -> {run / 'cam'}",
        f"[6/6] writing the concept explorer -> {out / 'explorer'}"]
    t = res["timings"]
    assert 0 <= res["cam_s"] <= t["total_s"] <= wall
    assert t["images_s"] + t["cache_s"] + t["train_s"] <= t["total_s"]


def test_a_retrain_gets_the_same_arguments(tmp_path, stages):
    demo.run_demo(tmp_path / "d", progress=False)
    stages.mismatch_once, stages.args = True, []
    demo.run_demo(tmp_path / "d", progress=False)
    trains = [a for a in stages.args if a[0] == "train"]
    manifest = json.loads((tmp_path / "d" / "store" / "manifest.json").read_text())
    assert trains == [("train", tmp_path / "d" / "run", False, manifest)] * 2
    assert [c[1] for c in stages.calls if c[0] == "train"][-1] == \
        [c[1] for c in stages.calls if c[0] == "train"][-2]  # the same config both times


def test_the_crops_default_to_seed_0_and_a_tenth_held_out(tmp_path, monkeypatch):
    photos = {"a": np.full((300, 500, 3), 10, np.uint8), "b": np.full((420, 380), 200, np.uint8)}
    monkeypatch.setattr(demo, "bundled_photos", lambda: photos)
    demo.make_crops(tmp_path / "x", 40)
    demo.make_crops(tmp_path / "y", 40, seed=0, val_fraction=0.1)
    listing = sorted(str(p.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*.jpg"))
    assert listing == sorted(str(p.relative_to(tmp_path / "y"))
                             for p in (tmp_path / "y").rglob("*.jpg"))
    val = [p for p in listing if p.startswith("val/")]
    assert 0 < len(val) < 12


def test_every_crop_lies_inside_its_photo_in_both_orientations(tmp_path, monkeypatch):
    photos = {"a": np.full((300, 300, 3), 120, np.uint8)}  # crops outside it would be black
    monkeypatch.setattr(demo, "bundled_photos", lambda: photos)
    demo.make_crops(tmp_path / "x", 40, seed=1)
    shapes = set()
    for p in (tmp_path / "x").rglob("*.jpg"):
        with Image.open(p) as img:
            px = np.asarray(img)
            assert px.min() > 100, p  # no padding from a box beyond the photo
            shapes.add("wide" if img.size[0] > img.size[1] else
                       "tall" if img.size[1] > img.size[0] else "square")
    assert {"wide", "tall"} <= shapes  # aspects from 3/4 to 4/3, both ways


def test_four_photos_are_enough_and_a_stereo_pair_gives_its_left_image(monkeypatch):
    import skimage.data as skd

    left = skd.stereo_motorcycle()[0]
    np.testing.assert_array_equal(demo.bundled_photos()["stereo_motorcycle"], left)
    monkeypatch.setattr(demo, "SKIMAGE_PHOTOS", ["camera"])  # 1 + 2 (sklearn) + 1 = 4
    assert len(demo.bundled_photos()) == 4


def test_each_crop_is_its_draws_replayed_from_the_seed(tmp_path, monkeypatch):
    """The docstring's recipe, draw by draw from the same generator: area 30-100 %, a
    log-uniform aspect 3/4-4/3, a uniform offset, a coin for the flip, a short side of
    256-399 px (bicubic), a draw for the split; saved as JPEG at quality 92."""
    import io

    yy, xx = np.mgrid[0:300, 0:360]
    photos = {"a": np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)}
    monkeypatch.setattr(demo, "bundled_photos", lambda: photos)
    demo.make_crops(tmp_path / "x", 12, seed=5, val_fraction=0.3)
    rng = np.random.default_rng(5)
    img = Image.fromarray(photos["a"])
    flips, sides = [], []
    for i in range(12):
        area = rng.uniform(0.3, 1.0) * 360 * 300
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(360, round(np.sqrt(area * aspect))))
        ch = int(min(300, round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, 360 - cw + 1)), int(rng.integers(0, 300 - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        flips.append(rng.random() < 0.5)
        if flips[-1]:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        sides.append(int(rng.integers(256, 400)))
        scale = sides[-1] / min(crop.size)
        crop = crop.resize((round(crop.size[0] * scale), round(crop.size[1] * scale)),
                           Image.BICUBIC)
        split = "val" if rng.random() < 0.3 else "train"
        want = io.BytesIO()
        crop.save(want, "JPEG", quality=92)
        path = tmp_path / "x" / split / "a" / f"{i:04d}.jpg"
        assert path.read_bytes() == want.getvalue(), i
    assert any(flips) and not all(flips), "both sides of the coin in 12 draws"
