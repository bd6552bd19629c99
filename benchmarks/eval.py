"""``usae eval`` speed and memory at the paper's dims on synthetic stores, beside the training
step's throughput on the same tokens, in the same run. Prints one JSON line.

Peak RSS is measured in a fresh process per store size: if eval holds no (N x n) matrix, the
peak does not grow with the number of images.

    python benchmarks/eval.py [--images 64,256]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {"siglip": 768, "dinov2": 384, "vit": 768}
TOKENS = 196


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(store: str, run: str, out: str) -> None:
    import threading

    from usae.analysis.evaluate import evaluate

    peak_anon = [0]
    done = threading.Event()

    def poll() -> None:  # anonymous memory only: memory-mapped store pages are page cache
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    t0 = time.perf_counter()
    report = evaluate(run, store, out, split="all", progress=False, plots=False)
    seconds = time.perf_counter() - t0
    done.set()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "tokens": report["n_tokens"], "peak_rss_mb": peak_mb,
                      "peak_anon_mb": peak_anon[0] / 1024}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="64,512")
    args = ap.parse_args()
    import torch

    from usae.config import resolve
    from usae.data.sources import StoreSource
    from usae.sae.trainer import Trainer
    from usae.store.writer import store_from_arrays

    tmp = Path(tempfile.mkdtemp(prefix="usae-bench-eval-"))
    try:
        sizes = [int(s) for s in args.images.split(",")]
        rng = np.random.default_rng(0)
        cfg = resolve(tuple(MODELS), tuple(MODELS.values()), "paper", {"max_steps": 1})
        results = []
        for n in sizes:
            arrays = {m: rng.standard_normal((n, TOKENS, d), dtype=np.float32)
                      for m, d in MODELS.items()}
            store = tmp / f"store{n}"
            store_from_arrays(store, arrays, splits=["train"] * n)
            del arrays
            run = tmp / "run"
            if not (run / "model.safetensors").exists():
                # one real training step: a run with BatchNorm statistics, timed below
                trainer = Trainer(cfg, run, progress=False)
                source = StoreSource(store, "train")
                trainer.fit(source)
                batch = next(source.batches(32, 0, 0))
                t0 = time.perf_counter()
                reps = 2
                for _ in range(reps):
                    trainer.train_step(batch, 1, 10)
                train_tokens_per_s = reps * batch["siglip"].shape[0] / (time.perf_counter() - t0)
            proc = subprocess.run([sys.executable, __file__, "--child", str(store), str(run),
                                   str(tmp / f"eval{n}")], capture_output=True, text=True,
                                  check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append({"images": n, "tokens": r["tokens"],
                            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
                            "peak_rss_mb": round(r["peak_rss_mb"], 1),
                            "peak_anon_mb": round(r["peak_anon_mb"], 1)})
            shutil.rmtree(store)
        eval_tps = min(r["tokens_per_s"] for r in results)
        print(json.dumps({
            "benchmark": "eval", "n_concepts": cfg.sae.n, "dims": list(MODELS.values()),
            "sizes": results, "eval_tokens_per_s": eval_tps,
            "train_tokens_per_s": round(train_tokens_per_s, 1),
            "eval_over_train_speed": round(eval_tps / train_tokens_per_s, 2),
            "peak_rss_growth_mb": round(results[-1]["peak_rss_mb"] - results[0]["peak_rss_mb"], 1),
            "peak_anon_growth_mb": round(results[-1]["peak_anon_mb"] - results[0]["peak_anon_mb"],
                                         1),
            "threads": torch.get_num_threads(),
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
