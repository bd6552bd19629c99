"""``usae cache`` throughput against the bare forward passes of the same backbones on the same
preprocessed batches, in the same run (demo models and demo images). Prints one JSON line.

Both use the allocator setting ``usae cache`` uses on the CPU (freed memory kept for reuse);
``bare_forward_default_malloc_s`` is one bare pass with glibc's defaults, for comparison.

    python benchmarks/cache.py [--images 96] [--batch 16] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from usae.data.backbones import build_backbones, expand_specs
from usae.data.cache import cache
from usae.data.images import list_images, load_rgb, preprocess_image
from usae.demo import make_crops
from usae.malloc import default_malloc, keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usae-bench-cache-"))
    try:
        make_crops(tmp / "images", args.images)
        backbones, _ = build_backbones(expand_specs("demo"))
        paths = [e["path"] for e in list_images(tmp / "images")]
        pixels = {b.name: [preprocess_image(load_rgb(p), b.preprocess) for p in paths]
                  for b in backbones}
        batches = [{b.name: torch.stack(pixels[b.name][s:s + args.batch]) for b in backbones}
                   for s in range(0, len(paths), args.batch)]

        def bare() -> float:
            t0 = time.perf_counter()
            for batch in batches:
                for b in backbones:
                    b.extract(batch[b.name])
            return time.perf_counter() - t0

        def cpu_s() -> tuple[float, float]:
            own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
            return own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime

        def full(i: int) -> tuple[float, float]:
            out = tmp / f"store{i}"
            stats: dict[str, float] = {}
            u0, s0 = cpu_s()
            t0 = time.perf_counter()
            cache("demo", tmp / "images", out, batch_size=args.batch, workers=args.workers,
                  progress=False, timings=stats)
            elapsed = time.perf_counter() - t0
            u1, s1 = cpu_s()
            user_s.append(u1 - u0)
            sys_s.append(s1 - s0)
            shutil.rmtree(out)
            in_loop.append(stats["seconds"] / stats["forward_seconds"] - 1)
            return stats["seconds"], elapsed

        bare()  # warm-up
        default_malloc()  # how a plain script runs: glibc maps and unmaps every large block
        plain_s = bare()
        keep_freed_memory()  # what usae cache does on the CPU; the bare passes below too
        bare()
        bare_t, cache_t, total_t, in_loop, user_s, sys_s = [], [], [], [], [], []
        for i in range(args.reps):
            bare_t.append(bare())
            loop, total = full(i)
            cache_t.append(loop)
            total_t.append(total)
        # medians of interleaved repetitions: this machine's speed drifts by 10-20 %
        b, c, whole = (float(np.median(x)) for x in (bare_t, cache_t, total_t))
        print(json.dumps({
            "benchmark": "cache", "images": len(paths), "models": [x.name for x in backbones],
            "batch": args.batch, "workers": args.workers, "threads": torch.get_num_threads(),
            "bare_forward_s": round(b, 3), "cache_s": round(c, 3),
            "bare_images_per_s": round(len(paths) / b, 2),
            "cache_images_per_s": round(len(paths) / c, 2),
            "overhead": round(c / b - 1, 4),
            "bare_forward_runs_s": [round(x, 2) for x in bare_t],
            "cache_runs_s": [round(x, 2) for x in cache_t],
            "overhead_in_loop": round(float(np.median(in_loop)), 4),
            "command_s": round(whole, 3),
            "overhead_with_setup": round(whole / b - 1, 4),
            "bare_forward_default_malloc_s": round(plain_s, 3),
            "default_malloc_over_kept": round(plain_s / b, 3),
            "cache_user_cpu_s": round(float(np.median(user_s)), 2),
            "cache_system_cpu_s": round(float(np.median(sys_s)), 2),
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
