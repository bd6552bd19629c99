"""``usae demo``: the whole pipeline offline, on real pretrained CNNs and real photos.

1. ~20 real photos bundled in scikit-image, scikit-learn and matplotlib become a few hundred
   images by seeded random crops (30-100% of the area), flips and scales, written as JPEGs in
   ``DIR/images/{train,val}/<photo>/``;
2. ``usae cache`` with the ``demo`` models (EfficientNet-Lite0/1/2, ImageNet weights from
   registry packages; 7x7, 8x8 and 9x9 grids aligned to 7x7) -> ``DIR/store``;
3. ``usae train --preset fast`` with the ``demo`` preset's data settings -> ``DIR/run`` (the
   sparse step; converges in CPU minutes with few dead concepts; see docs/RESULTS.md);
4. ``usae eval`` -> ``DIR/eval``, and ``usae explore`` -> ``DIR/explorer``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from usae.analysis.eval_folder import REPORT_FILE
from usae.analysis.evaluate import evaluate
from usae.cam.maximize import run_cam
from usae.config import DEMO_DATA, resolve
from usae.data.cache import cache
from usae.data.sources import StoreSource
from usae.errors import ConfigMismatch, UsaeError
from usae.explorer.build import build_explorer
from usae.options import CamOptions
from usae.sae import run as run_folder
from usae.sae.training import train_run
from usae.store.store import Store, read_manifest

log = logging.getLogger(__name__)
# CPU-sized CAM for the demo's models (EfficientNet-Lite at their native 224-260 px inputs)
DEMO_CAM = {"top": 3, "options": CamOptions(steps=64, size=224, crops=1, lr=0.15)}
DEMO_CAM_QUICK = {"top": 1, "options": CamOptions(steps=4, size=64, crops=1)}

SKIMAGE_PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "retina", "coins", "clock", "moon", "page", "text", "brick", "grass", "gravel",
                  "immunohistochemistry", "stereo_motorcycle", "cell"]


def bundled_photos() -> dict[str, np.ndarray]:
    """Real photos that ship inside installed packages, as uint8 arrays (H, W, 3 or H, W)."""
    photos: dict[str, np.ndarray] = {}
    try:
        import skimage.data as skd

        for name in SKIMAGE_PHOTOS:
            try:
                img = getattr(skd, name)()
            except Exception:  # noqa: BLE001 - some need a download in other versions
                continue
            photos[name] = img[0] if isinstance(img, tuple) else img
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images):
            photos[name] = img
    except ImportError:
        pass
    try:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            photos["grace_hopper"] = np.asarray(Image.open(fh).convert("RGB"))
    except (ImportError, OSError):
        pass
    if len(photos) < 4:
        raise UsaeError("the demo needs the photos bundled in scikit-image, scikit-learn and "
                        "matplotlib: `pip install usae[demo]`")
    return photos


def make_crops(out: Path, n_images: int, seed: int = 0, val_fraction: float = 0.1) -> int:
    """Seeded random crops (area 30-100%, aspect 3/4-4/3), flips and scales of the photos."""
    from PIL import Image

    photos = bundled_photos()
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    written = 0
    for i in range(n_images):
        name = names[i % len(names)]
        img = Image.fromarray(photos[name]).convert("RGB")
        w, h = img.size
        area = rng.uniform(0.3, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        side = int(rng.integers(256, 400))  # a random scale, larger than every model's input
        scale = side / min(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)),
                            max(1, round(crop.size[1] * scale))), Image.BICUBIC)
        split = "val" if rng.random() < val_fraction else "train"
        path = out / split / name / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=92)
        written += 1
    return written


def run_demo(out: str | Path, n_images: int = 320, steps: int = 0, models: str = "demo",
             quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every stage into ``out``; stages already finished are reused (re-run resumes)."""
    out = Path(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if quick:
        n_images, steps = min(n_images, 48), steps or 40
    images = out / "images"
    if not images.exists():
        log.info("[1/6] making %d crops of bundled photos in %s", n_images, images)
        tmp = out / "images.partial"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        make_crops(tmp, n_images)
        tmp.rename(images)
    timings["images_s"] = time.perf_counter() - t0

    store_dir = out / "store"
    if not (store_dir / "manifest.json").exists() or \
            read_manifest(store_dir)["state"] != "final":
        log.info("[2/6] caching activations of %s -> %s", models, store_dir)
        cache(models, images, store_dir, batch_size=16, progress=progress)
    store = Store(store_dir)
    timings["cache_s"] = time.perf_counter() - t0 - sum(timings.values())

    run = out / "run"
    overrides: dict[str, Any] = {"log_every": 20, "checkpoint_every": 500}
    source = StoreSource(store, "train")
    if steps:
        overrides["max_steps"] = steps
    if quick:
        overrides.update({"n_concepts": 256, "batch_images": 4})
    # the `fast` maths with the demo's data settings: the best held-out cross R² at equal
    # wall time with the fewest dead concepts on this store (docs/RESULTS.md)
    cfg = resolve(store.models, store.dims, "fast", {**DEMO_DATA, "epochs": 60, **overrides})
    log.info("[3/6] training a universal SAE (%s) -> %s", cfg.preset, run)
    resume = (run / run_folder.CHECKPOINT_FILE).exists()
    try:
        train_run(cfg, source, run, resume=resume, force=not resume, progress=progress,
                  store_manifest=store.manifest)
    except ConfigMismatch:
        if not resume:
            raise
        log.info("the demo's settings changed: training %s again", run)
        train_run(cfg, source, run, force=True, progress=progress,
                  store_manifest=store.manifest)
    timings["train_s"] = time.perf_counter() - t0 - sum(timings.values())
    results = {"out": str(out), "timings": timings}
    results.update(_analysis_stages(out, run, store_dir, progress, quick))
    results["timings"]["total_s"] = time.perf_counter() - t0
    return results


def _analysis_stages(out: Path, run: Path, store_dir: Path, progress: bool,
                     quick: bool) -> dict[str, Any]:
    """Eval on the held-out crops, CAM for the top universal concepts, then the explorer."""
    found: dict[str, Any] = {}
    log.info("[4/6] evaluating on the held-out crops -> %s", out / "eval")
    report = evaluate(run, store_dir, out / "eval", progress=progress)
    found["report"] = out / "eval" / REPORT_FILE
    found["r2"] = report.r2
    found["faithfulness"] = report.faithfulness
    t0 = time.perf_counter()
    cam = DEMO_CAM_QUICK if quick else DEMO_CAM
    log.info("[5/6] coordinated activation maximization, top %d concepts -> %s",
             cam["top"], run / "cam")
    found["cam"] = run_cam(run, store_dir, top=cam["top"], eval_dir=out / "eval",
                           options=cam["options"], progress=progress)
    found["cam_s"] = time.perf_counter() - t0
    log.info("[6/6] writing the concept explorer -> %s", out / "explorer")
    build_explorer(run, store_dir, out / "explorer", eval_dir=out / "eval", progress=progress)
    found["explorer"] = out / "explorer" / "index.html"
    return found
