"""What faithfulness adds to ``usae eval``: the same eval of the demo's run with and without
it, interleaved round by round in one process (the machine's drift hits both alike). Needs the
outputs of ``make demo`` (real EfficientNet-Lites and their images). Prints one JSON object as
its last line: medians in seconds and the ratio ``with_over_without``.

    python benchmarks/faithfulness.py [--demo demo-output] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="demo-output")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    demo = Path(args.demo)
    if not (demo / "run" / "model.safetensors").exists():
        sys.exit(f"{demo} has no finished demo run — run `make demo` first")
    from usae.analysis.evaluate import evaluate

    times: dict[str, list[float]] = {"with": [], "without": []}
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for key in ("without", "with"):
                t0 = time.perf_counter()
                report = evaluate(demo / "run", demo / "store", Path(tmp) / f"{key}{r}",
                                  plots=False, progress=False, faithfulness=key == "with")
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    f = report.get("faithfulness", {})
    print(json.dumps({"images": f.get("n_images"), "models": f.get("models"),
                      "eval_s": round(med["without"], 3), "eval_faithfulness_s":
                      round(med["with"], 3), "faithfulness_s": round(med["with"] -
                                                                     med["without"], 3),
                      "with_over_without": round(med["with"] / med["without"], 3),
                      "rounds": args.rounds}))


if __name__ == "__main__":
    main()
