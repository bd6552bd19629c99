"""The objectives side by side on a synthetic ground truth (issue 24): for each row, train
through the CLI on one ``usae synth`` set and score it with ``usae eval --truth``.

Columns: recovery per model, shared/partial features as one concept, model-specific features
detected, MCC, self and cross held-out R², dead fraction, Jaccard of active sets, training
tokens/s (wall clock of the whole run, alone on the machine or not: say which). Prints one
JSON object per row, then one JSON object with every row as its last line.

    python benchmarks/objectives.py --out /tmp/obj [--synth "--mean-shift 2"] [--epochs 10]
        [--rows fast,fast_batchtopk,...] [--threads 1]

``--epochs 0 --rows paper,best,fast`` is each preset with no other setting (issue 23's
acceptance: ``fast`` alone must recover a synthetic set with a nonzero mean).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

USAE = [sys.executable, "-m", "usae"]

# each row: a preset and the training keys it adds
ROWS: dict[str, tuple[str, list[str]]] = {
    "paper": ("paper", []),
    "best": ("best", []),
    "fast": ("fast", []),
    # the fast preset before its energy rule and min_steps (issue 23)
    "fast_topk": ("fast", ["--sparsity", "topk", "--min-steps", "0"]),
    "fast_batchtopk": ("fast", ["--sparsity", "batchtopk"]),
    "fast_matryoshka": ("fast", ["--matryoshka", "{m1},{m2}"]),
    "fast_batchtopk_matryoshka": ("fast", ["--sparsity", "batchtopk", "--matryoshka",
                                           "{m1},{m2}"]),
    "fast_global": ("fast", ["--active-set", "global"]),
    "fast_global_cross": ("fast", ["--active-set", "global", "--cross-coef", "1"]),
    "fast_global_batchtopk": ("fast", ["--active-set", "global", "--sparsity", "batchtopk"]),
}


def sh(args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")


def off_mean(mat: list[list[float | None]]) -> float | None:
    a = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=float)
    off = a[~np.eye(len(a), dtype=bool)]
    return None if off.size == 0 else round(float(np.nanmean(off)), 4)


def row_of(name: str, run: Path, report: dict, seconds: float) -> dict:
    t = report["truth"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    r2 = np.array(report["r2"], dtype=float)
    return {"row": name, "recovery": t["recovery"], "shared_as_one": t["shared_as_one"],
            "partial_as_one": t.get("partial_as_one"),
            "specific_detected": t["specific_detected"], "mcc_mean": t["mcc_mean"],
            "spurious": t["spurious"]["fraction"],
            "self_r2": round(float(np.diag(r2).mean()), 4), "cross_r2": off_mean(report["r2"]),
            "dead_fraction": round(float(np.mean(list(report["dead_fraction"].values()))), 4),
            "jaccard_cross": off_mean(report["jaccard"]),
            "l0": {m: round(v, 2) for m, v in report["l0"].items()},
            "train_tokens_per_s": round(metrics[-1]["tokens"] / metrics[-1]["elapsed_s"]),
            "wall_s": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--synth", default="--mean-shift 2", help="usae synth options")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of every row; 0: the preset's own (no --epochs given)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", default="1", help="OMP_NUM_THREADS for every command")
    p.add_argument("--extra", default="", help="training flags added to every row")
    args = p.parse_args()
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": args.threads, "USAE_THREADS": args.threads}
    if not (out / "synth" / "truth.json").exists():
        sh([*USAE, "synth", "--out", str(out / "synth"), *shlex.split(args.synth)], env)
    n = json.loads((out / "synth" / "store" / "manifest.json").read_text())
    n_concepts = 8 * max(m["d"] for m in n["models"].values())
    rows = []
    for name in args.rows.split(","):
        preset, flags = ROWS[name]
        flags = [f.format(m1=n_concepts // 8, m2=n_concepts // 2) for f in flags]
        run, ev = out / "runs" / name, out / "evals" / name
        t0 = time.perf_counter()
        sh([*USAE, "train", "--store", str(out / "synth" / "store"), "--out", str(run),
            "--preset", preset, *(["--epochs", str(args.epochs)] if args.epochs else []),
            "--no-progress", "--force",
            *flags, *shlex.split(args.extra)], env)
        seconds = time.perf_counter() - t0
        sh([*USAE, "eval", str(run), "--store", str(out / "synth" / "store"), "--out", str(ev),
            "--truth", str(out / "synth"), "--no-plots", "--no-faithfulness", "--force"], env)
        row = row_of(name, run, json.loads((ev / "report.json").read_text()), seconds)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"synth": args.synth, "epochs": args.epochs, "threads": args.threads,
                      "rows": rows}))


if __name__ == "__main__":
    main()
