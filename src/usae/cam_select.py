"""Which concepts ``usae cam`` visualizes: given ids, or the most energetic universal ones."""

from __future__ import annotations

import tempfile
from pathlib import Path

from usae.errors import UsaeError
from usae.evaluate import evaluate, read_concepts_csv
from usae.options import EvalOptions
from usae.sae import UniversalSAE


def pick_concepts(sae: UniversalSAE, run: Path, store_path: str | Path,
                  concepts: list[int] | None, top: int | None,
                  eval_dir: str | Path | None, progress: bool = True) -> list[int]:
    """``concepts`` checked against n, or the ``top`` most energetic universal concepts of
    ``eval_dir`` (evaluated now on every image when no eval is given); when fewer are
    universal, the most energetic of the rest fill in."""
    n = sae.cfg.n
    if concepts is not None:
        bad = [k for k in concepts if not 0 <= int(k) < n]
        if bad or not concepts:
            raise UsaeError(f"concept(s) {bad or concepts} do not exist; this run has concepts "
                            f"0..{n - 1}")
        return [int(k) for k in concepts]
    if not top or top < 1:
        raise UsaeError("give --concept K[,K...] or --top N (N >= 1)")
    if eval_dir is not None and (Path(eval_dir) / "concepts.csv").exists():
        rows = read_concepts_csv(Path(eval_dir) / "concepts.csv")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            evaluate(run, store_path, Path(tmp) / "eval", EvalOptions(split="all", plots=False),
                     progress=progress)
            rows = read_concepts_csv(Path(tmp) / "eval" / "concepts.csv")
    ranked = sorted(rows, key=lambda r: -float(r["energy"]))
    universal = [int(r["concept"]) for r in ranked if r["class"] == "universal"]
    rest = [int(r["concept"]) for r in ranked if r["class"] != "universal"
            and float(r["energy"]) > 0]
    return (universal + rest)[:top]
