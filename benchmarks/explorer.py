"""Explorer size and load time at the paper's concept count (n = 6144), in headless Chromium.

A synthetic store at the paper's dims (3 models, 14x14 tokens) whose rows stand for real
demo crops (so thumbnails are real JPEGs), a universal SAE with n = 6144 after a few training
steps, ``usae eval`` on every image, then ``usae explore``. Random-ish codes spread the top
images widely, so this is a pessimistic size. Prints one JSON line.

    python benchmarks/explorer.py [--images 600]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {"siglip": 768, "dinov2": 384, "vit": 768}
TOKENS = 196
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def site_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def load_time(index: Path, reps: int = 3) -> float:
    from playwright.sync_api import sync_playwright

    best = float("inf")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for _ in range(reps):
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(index.as_uri())
            page.wait_for_selector("#concepts tr[data-concept]")
            page.click("th[data-key=firing_entropy]")  # interactive: a sort responds
            page.wait_for_selector("th.sorted[data-key=firing_entropy]")
            best = min(best, time.perf_counter() - t0)
            page.close()
        browser.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from usae.analysis.evaluate import evaluate
    from usae.config import resolve
    from usae.data.images import list_images
    from usae.data.sources import StoreSource
    from usae.demo import make_crops
    from usae.explorer.build import build_explorer
    from usae.sae.trainer import Trainer
    from usae.store.writer import store_from_arrays

    tmp = Path(tempfile.mkdtemp(prefix="usae-bench-explorer-"))
    try:
        make_crops(tmp / "images", args.images)
        paths = [e["path"] for e in list_images(tmp / "images")]
        rng = np.random.default_rng(0)
        latent = rng.standard_normal((len(paths), TOKENS, 64), dtype=np.float32)
        arrays = {m: latent @ rng.standard_normal((64, d), dtype=np.float32)
                  + 0.3 * rng.standard_normal((len(paths), TOKENS, d), dtype=np.float32)
                  for m, d in MODELS.items()}
        store_from_arrays(tmp / "store", arrays, paths=paths, splits=["train"] * len(paths))
        cfg = resolve(tuple(MODELS), tuple(MODELS.values()), "paper",
                      {"max_steps": args.steps, "lr": 3e-3, "warmup_steps": 2,
                       "batch_images": 8})
        Trainer(cfg, tmp / "run", progress=False).fit(StoreSource(tmp / "store", "train"))
        t0 = time.perf_counter()
        evaluate(tmp / "run", tmp / "store", tmp / "eval", split="all", progress=False)
        eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = build_explorer(tmp / "run", tmp / "store", tmp / "site", eval_dir=tmp / "eval",
                               progress=False)
        build_s = time.perf_counter() - t0
        size = site_bytes(tmp / "site")
        result = {"benchmark": "explorer", "n_concepts": cfg.sae.n, "images": len(paths),
                  "tokens_per_image": TOKENS, "site_mb": round(size / 1e6, 2),
                  "overview_js_mb": round(os.path.getsize(tmp / "site/data/overview.js") / 1e6, 2),
                  "build_s": round(build_s, 2), "eval_s": round(eval_s, 2)}
        result["overview_load_s"] = round(load_time(index), 3) if Path(CHROMIUM).exists() \
            else None
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
