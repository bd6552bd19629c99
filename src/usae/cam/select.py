"""Which concepts ``usae cam`` visualizes: given ids, or the most energetic universal ones of
a finished eval (``usae.analysis.eval_folder``)."""

from __future__ import annotations

import logging
from pathlib import Path

from usae.analysis.eval_folder import (
    CONCEPTS_FILE,
    REPORT_FILE,
    check_eval_of_run,
    read_concepts,
    universal_first,
)
from usae.analysis.evaluate import evaluate
from usae.errors import UsaeError
from usae.options import EvalOptions
from usae.sae.model import UniversalSAE

log = logging.getLogger(__name__)


def pick_concepts(sae: UniversalSAE, run: Path, store_path: str | Path,
                  concepts: list[int] | None, top: int | None,
                  eval_dir: str | Path | None, progress: bool = True,
                  ranking_dir: str | Path | None = None) -> list[int]:
    """``concepts`` checked against n, or the ``top`` most energetic universal concepts of
    ``eval_dir``; when fewer are universal, the most energetic of the rest fill in. Without
    an eval, the run is evaluated once on every image into ``ranking_dir`` (kept: the next
    ``--top`` reads it), and the log says so."""
    n = sae.cfg.n
    if concepts is not None:
        bad = [k for k in concepts if not 0 <= int(k) < n]
        if bad or not concepts:
            raise UsaeError(f"concept(s) {bad or concepts} do not exist; this run has concepts "
                            f"0..{n - 1}")
        return [int(k) for k in concepts]
    if not top or top < 1:
        raise UsaeError("give --concept K[,K...] or --top N (N >= 1)")
    if eval_dir is None:
        if ranking_dir is None:
            raise UsaeError("--top needs an eval to rank concepts: pass --eval EVAL (made by "
                            "`usae eval RUN --store STORE --out EVAL`)")
        eval_dir = Path(ranking_dir)
        if not _is_eval_of(eval_dir, run, sae):
            log.info("no --eval given: evaluating the run once on every image into %s (the "
                     "next --top reuses it)", eval_dir)
            evaluate(run, store_path, eval_dir, EvalOptions(split="all", plots=False,
                                                            faithfulness=False),
                     progress=progress, force=True)
    return universal_first(read_concepts(eval_dir))[:top]


def _is_eval_of(eval_dir: Path, run: Path, sae: UniversalSAE) -> bool:
    """Whether ``eval_dir`` holds a finished eval of this run (as it is now)."""
    if not (eval_dir / CONCEPTS_FILE).exists():
        return False
    try:
        check_eval_of_run(eval_dir, run, list(sae.models), sae.cfg.n,
                          need=(REPORT_FILE, CONCEPTS_FILE))
    except UsaeError:
        return False
    return True
