"""Streaming training (activations computed on the fly) against training from a store, on the
demo models (EfficientNet-Lite0/1/2, pretrained) and the demo's photo crops.

Caches the crops once (timed), then trains the same ``demo``-preset run for ``--steps`` steps
from the store and streamed from the images, alternating ``--reps`` times. Streaming pays the
backbones at every epoch; the store pays them once, plus its disk. ``break_even_epochs``: the
number of epochs after which caching first is cheaper. Prints one JSON object last.

    python benchmarks/stream.py [--images 96] [--steps 12] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from usae.config import TRAIN_PRESETS
from usae.data.cache import cache
from usae.data.streaming import train_from_images
from usae.demo import make_crops
from usae.sae.training import train_from_store

SETS = ["log_every=1000", "checkpoint_every=100000"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="demo", help="model specs (default: the demo's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            make_crops(root / "images", args.images)
            photos = "demo crops"
        except ImportError:  # a machine without scikit-image/scikit-learn: noise images
            photos = "noise"
            rng = np.random.default_rng(0)
            for i in range(args.images):
                path = root / "images" / ("val" if i % 10 == 0 else "train") / f"{i:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (300, 320, 3), np.uint8)).save(path)
        t0 = time.perf_counter()
        cache(args.models, root / "images", root / "store", batch_size=16, workers=args.workers,
              progress=False, device=args.device)
        cache_s = time.perf_counter() - t0
        store_tps, stream_tps = [], []
        for rep in range(args.reps):
            s = train_from_store(root / "store", root / f"store-run{rep}", preset="demo",
                                 sets=SETS, max_steps=args.steps, progress=False,
                                 device=args.device)
            store_tps.append(s["tokens"] / s["elapsed_s"])
            s = train_from_images(root / "images", args.models, root / f"stream-run{rep}",
                                  preset="demo", sets=SETS, max_steps=args.steps,
                                  progress=False, workers=args.workers, device=args.device)
            stream_tps.append(s["tokens"] / s["elapsed_s"])
            tokens_per_image = s["tokens"] / (s["steps"] * TRAIN_PRESETS["demo"]["batch_images"])
    store, stream = max(store_tps), max(stream_tps)
    train_images = args.images * 0.9
    epoch_stream_s = train_images * tokens_per_image / stream
    epoch_store_s = train_images * tokens_per_image / store
    print(json.dumps({
        "device": args.device, "models": args.models, "photos": photos, "images": args.images, "steps": args.steps, "tokens_per_image": tokens_per_image,
        "store_tokens_per_s": round(store), "stream_tokens_per_s": round(stream),
        "stream_over_store": round(stream / store, 4),
        "cache_images_per_s": round(args.images / cache_s, 2),
        "break_even_epochs": round(cache_s / max(epoch_stream_s - epoch_store_s, 1e-9), 2)}))


if __name__ == "__main__":
    main()
