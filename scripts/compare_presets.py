"""Presets at equal wall time on the demo store: held-out cross R², self R², dead fraction and
firing-entropy median for paper, best, demo and fast (docs/RESULTS.md).

    python scripts/compare_presets.py DEMO_DIR OUT [SECONDS]

Each preset's step time is measured over 30 steps first; it then trains for as many steps as
fit in SECONDS (default 120). `fast` runs with the demo's data settings (lr, batch, centering,
n), which is what `usae demo` would use.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from usae.analysis.evaluate import evaluate
from usae.config import DEMO_DATA, resolve
from usae.data.sources import StoreSource
from usae.sae.training import train_run
from usae.store.store import Store

VARIANTS = {"paper": ("paper", {"n_concepts": 2048}), "best": ("best", {"n_concepts": 2048}),
            "demo": ("demo", {}), "fast": ("fast", DEMO_DATA)}


def main() -> None:
    demo, out = Path(sys.argv[1]), Path(sys.argv[2])
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
    store = Store(demo / "store")
    rows = []
    for name, (preset, over) in VARIANTS.items():
        probe = resolve(store.models, store.dims, preset, {**over, "max_steps": 30})
        t0 = time.perf_counter()
        train_run(probe, StoreSource(store, "train"), out / f"{name}-probe", force=True,
                  progress=False)
        step_s = (time.perf_counter() - t0) / 30
        steps = max(30, int(seconds / step_s))
        cfg = resolve(store.models, store.dims, preset, {**over, "max_steps": steps,
                                                         "log_every": 50})
        t0 = time.perf_counter()
        train_run(cfg, StoreSource(store, "train"), out / name, force=True, progress=False)
        wall = time.perf_counter() - t0
        rep = evaluate(out / name, demo / "store", out / name / "eval", plots=False,
                       progress=False)
        s = rep["summary"]
        rows.append({"preset": name, "steps": steps, "train_s": round(wall, 1),
                     "cross_r2": round(s["cross_r2_mean"], 4),
                     "self_r2": round(s["self_r2_mean"], 4),
                     "dead_fraction": round(sum(rep["dead_fraction"].values()) / 3, 4),
                     "fe_median": round(s["firing_entropy_median"] or float("nan"), 3),
                     "universal": rep["concept_classes"]["universal"]})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    main()
