"""Adding a model to a trained run (issue 25), on a synthetic ground truth: train on two of a
`usae synth` set's three models, add the third with `usae train --extend`, and compare with a
three-model run from scratch on the same store.

The synthetic models have no backbone, so `usae store add-model` cannot extract the third
one; the script stages its array as add-model would (a finished store of the new model
alone) and joins it with add-model's own join, so the store records the two-model store's
content hash in its history, as after a real add-model.

Per run: held-out R² between the new model and the old ones in both directions, dead
fraction, shared features found as one concept in all three models, how often a shared
feature's best concept in the new model is its best concept in the old ones, and wall time.
Prints one JSON object as its last line.

    python benchmarks/extend.py --out /tmp/ext [--epochs 10] [--k 8] [--threads 1]
        [--match-coef 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from usae.analysis.truth import cosines, load_truth, raw_directions
from usae.data.store_add import _join
from usae.files import atomic_write_json
from usae.sae.model import UniversalSAE
from usae.store.store import content_hash, read_manifest

USAE = [sys.executable, "-m", "usae"]


def sh(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def subset_store(full: Path, out: Path, models: list[str]) -> None:
    """A copy of ``full`` with only ``models`` (their arrays, entries and statistics)."""
    out.mkdir(parents=True)
    manifest = read_manifest(full)
    for m in models:
        shutil.copy(full / f"acts_{m}.bin", out / f"acts_{m}.bin")
    manifest["models"] = {m: manifest["models"][m] for m in models}
    manifest["stats"] = {m: manifest["stats"][m] for m in models}
    manifest["content_hash"] = content_hash(out, manifest)
    atomic_write_json(out / "manifest.json", manifest)


def same_concept(run: Path, synth: Path, old: list[str], new: str) -> float:
    """Of the shared features, the fraction whose best concept in the new model is their
    best concept in every old model."""
    _, truth = load_truth(synth)
    sae = UniversalSAE.load(run)
    kind = truth["kind"].numpy()
    best = {m: cosines(truth[f"atoms.{m}"].numpy(), raw_directions(sae, m)).argmax(1)
            for m in [*old, new]}
    shared = np.flatnonzero(kind == 0)
    return round(float(np.mean([all(best[new][f] == best[m][f] for m in old)
                                for f in shared])), 4)


def summary(name: str, ev: Path, run: Path, synth: Path, seconds: float) -> dict:
    report = json.loads((ev / "report.json").read_text())
    r2, models = np.array(report["r2"], dtype=float), report["models"]
    new = len(models) - 1
    return {"run": name, "train_s": round(seconds, 1),
            "r2_new_to_old": round(float(r2[new, :new].mean()), 4),
            "r2_old_to_new": round(float(r2[:new, new].mean()), 4),
            "r2_self_new": round(float(r2[new, new]), 4),
            "dead_fraction": report["dead_fraction"],
            "shared_as_one": report["truth"]["shared_as_one"],
            "recovery": report["truth"]["recovery"],
            "same_concept_new_vs_old": same_concept(run, synth, models[:new], models[new])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", default="1")
    p.add_argument("--match-coef", type=float, default=0.0,
                   help="also an extension with the code-matching loss at this weight")
    args = p.parse_args()
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": args.threads, "USAE_THREADS": args.threads}
    synth = out / "synth"
    if not (synth / "truth.json").exists():
        sh([*USAE, "synth", "--out", str(synth), "--mean-shift", "2"], env)
    models = list(read_manifest(synth / "store")["models"])
    old, new = models[:-1], models[-1]
    two, three = out / "store2", out / "store3"
    if not three.exists():
        subset_store(synth / "store", two, old)
        shutil.copytree(two, three)
        subset_store(synth / "store", three / f".add-{new}", [new])
        _join(three, three / f".add-{new}")
    keys = ["--preset", "fast", "--epochs", str(args.epochs), "--k", str(args.k),
            "--no-progress", "--force"]
    rows = []
    t_old = sh([*USAE, "train", "--store", str(two), "--out", str(out / "run-old"), *keys], env)
    t_ext = sh([*USAE, "train", "--extend", str(out / "run-old"), "--store", str(three),
                "--out", str(out / "run-extended"), "--epochs", str(args.epochs),
                "--no-progress", "--force"], env)
    t_new = sh([*USAE, "train", "--store", str(three), "--out", str(out / "run-scratch"),
                *keys], env)
    timed = [("extended", t_ext), ("scratch", t_new)]
    if args.match_coef:
        timed.append(("extended-matched", sh(
            [*USAE, "train", "--extend", str(out / "run-old"), "--store", str(three), "--out",
             str(out / "run-extended-matched"), "--epochs", str(args.epochs), "--match-coef",
             str(args.match_coef), "--no-progress", "--force"], env)))
    for name, seconds in timed:
        run, ev = out / f"run-{name}", out / f"eval-{name}"
        sh([*USAE, "eval", str(run), "--store", str(three), "--out", str(ev), "--truth",
            str(synth), "--no-plots", "--no-faithfulness", "--force"], env)
        rows.append(summary(name, ev, run, synth, seconds))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"epochs": args.epochs, "k": args.k, "threads": args.threads,
                      "old_run_train_s": round(t_old, 1), "rows": rows}))


if __name__ == "__main__":
    main()
