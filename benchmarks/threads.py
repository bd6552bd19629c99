"""torch's intra-op threads on a shared machine: one `usae train --preset fast` run (demo-like
dims) timed under each threading setting, on a quiet machine and beside a busy-loop process
that keeps one core loaded (the "other work" of issue 22, item 17). Variants run interleaved,
round by round, so the load and the machine's drift hit them alike. Prints one JSON object as
its last line: the median seconds of each (setting, load) and the speed-ups over torch's
default (`default`: USAE_THREADS=all); `auto` is usae's default, which measures the busy
cores at the start (usae.threads).

    python benchmarks/threads.py [--rounds 3] [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "default": {"USAE_THREADS": "all"},              # torch's default: one thread per core
    "auto": {},                                      # usae's default (usae.threads)
    "one_thread": {"OMP_NUM_THREADS": "1"},
    "passive_wait": {"USAE_THREADS": "all", "OMP_WAIT_POLICY": "PASSIVE"},  # threads sleep
}


def make_store(path: Path) -> None:
    from usae.store.writer import store_from_arrays

    rng = np.random.default_rng(0)
    latent = np.maximum(rng.normal(size=(320, 49, 64)), 0) * (rng.random((320, 49, 64)) < 0.1)
    arrays = {m: (latent @ rng.normal(size=(64, d))).astype(np.float32)
              for m, d in (("a", 320), ("b", 320), ("c", 352))}
    store_from_arrays(path, arrays)


def busy_core() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def train_once(store: Path, out: Path, env_extra: dict[str, str], steps: int) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "USAE_THREADS")}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "usae", "train", "--store", str(store), "--out", str(out),
           "--force", "--preset", "fast", "--max-steps", str(steps), "--no-progress",
           "--set", "n_concepts=2048", "--set", "batch_images=8", "--set", "lr=3e-3",
           "--set", "standardize=center_per_dim", "--set", "checkpoint_every=100000"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=900)
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return float(json.loads(last)["elapsed_s"])  # the training loop alone, not the imports


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    times: dict[str, list[float]] = {f"{s}_{load}": [] for s in SETTINGS
                                     for load in ("quiet", "loaded")}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store)
        for _ in range(args.rounds):
            for load in ("quiet", "loaded"):
                hog = busy_core() if load == "loaded" else None
                try:
                    time.sleep(0.5 if hog else 0)
                    for name, env in SETTINGS.items():
                        times[f"{name}_{load}"].append(
                            train_once(store, Path(tmp) / "run", env, args.steps))
                finally:
                    if hog:
                        hog.kill()
                        hog.wait()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out = {"cores": os.cpu_count(), "steps": args.steps, "rounds": args.rounds,
           **{f"{k}_s": v for k, v in med.items()}}
    for load in ("quiet", "loaded"):
        for name in SETTINGS:
            if name != "default":
                out[f"{name}_over_default_{load}"] = round(
                    med[f"default_{load}"] / med[f"{name}_{load}"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
