"""The eval folder (``EVAL/``): its file names, and which run it belongs to.

Layout of ``EVAL/`` (written by ``usae eval``)::

    report.json              the metrics; ``run`` says which run and step were evaluated
    concepts.csv             one row per concept
    top_images.safetensors   the top store rows per concept

Commands that read an eval of a run (``push --eval``, ``concepts``, ``cam --eval``,
``explore --eval``) call ``check_eval_of_run`` first: an eval of another run is refused, so a
model card, table or explorer never mixes two runs.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from usae.errors import UsaeError
from usae.files import atomic_write_json, read_json
from usae.sae import run as run_folder

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"
CONCEPTS_FILE = "concepts.csv"
TOP_IMAGES_FILE = "top_images.safetensors"
EVAL_FILES = (REPORT_FILE, CONCEPTS_FILE, TOP_IMAGES_FILE)


def weights_digest(run: str | Path) -> str:
    """SHA-256 of the run's ``model.safetensors``: the same bytes locally and from the Hub."""
    h = hashlib.sha256()
    try:
        with open(Path(run) / run_folder.WEIGHTS_FILE, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    except OSError as err:
        raise UsaeError(f"cannot read {Path(run) / run_folder.WEIGHTS_FILE}: "
                        f"{err.strerror or err}") from None
    return h.hexdigest()


def run_identity(run: str | Path) -> dict[str, Any]:
    """What ``report.json`` records of the evaluated run: its path, step and weights digest."""
    status = run_folder.run_status(run)
    return {"path": str(run), "step": status.get("step"), "state": status.get("state"),
            "weights_sha256": weights_digest(run)}


T = TypeVar("T")


class _Key(Generic[T]):
    """A report key read as a typed attribute of ``EvalReport`` (the attribute's name is the
    key): required ones raise KeyError when missing, optional ones read None."""

    def __init__(self, required: bool = True) -> None:
        self.required = required

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, report: "EvalReport | None", owner: type | None = None) -> T:
        if report is None:
            return self  # type: ignore[return-value]  # (read on the class: the key itself)
        data = report._data
        return data[self.key] if self.required else data.get(self.key)


class EvalReport(Mapping[str, Any]):
    """``report.json``, typed for the commands that read an eval (its keys: CONTRACT.md).

    The attributes are the sections readers use; as a mapping it is the whole report as
    written (``report["jaccard"]``), so a key added to the report needs no change here.
    Read with ``read_report``, written with ``write_report``: nowhere else."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_json(self) -> dict[str, Any]:
        """A copy of the report as a plain dict (JSON-ready)."""
        return dict(self._data)

    def with_changes(self, **keys: Any) -> "EvalReport":
        """A copy with ``keys`` set (e.g. the explorer's ``top_images_split``)."""
        return EvalReport({**self._data, **keys})

    @property
    def models(self) -> list[str]:
        return list(self._data["models"])

    @property
    def n_concepts(self) -> int | None:
        """Concepts of the evaluated run (None in evals written before it was recorded)."""
        n = self._data.get("n_concepts")
        return None if n is None else int(n)

    @property
    def run(self) -> dict[str, Any] | None:
        """Which run and step were evaluated (path, step, state, weights_sha256)."""
        run = self._data.get("run")
        return run if isinstance(run, dict) else None

    # the sections as written (KeyError for a missing required one; None for optional ones)
    r2: _Key[list[list[float | None]]] = _Key()  # (M, M): row = encoded, column = decoded
    l0: _Key[dict[str, float]] = _Key()
    dead_fraction: _Key[dict[str, float]] = _Key()
    concept_classes: _Key[dict[str, Any]] = _Key()
    summary: _Key[dict[str, Any]] = _Key()
    split: _Key[str | None] = _Key(required=False)
    faithfulness: _Key[dict[str, Any] | None] = _Key(required=False)
    truth: _Key[dict[str, Any] | None] = _Key(required=False)


def write_report(eval_dir: str | Path, report: Mapping[str, Any]) -> None:
    """``EVAL/report.json``, atomically."""
    atomic_write_json(Path(eval_dir) / REPORT_FILE, dict(report))  # (an EvalReport or a dict)


def read_report(eval_dir: str | Path) -> EvalReport:
    """``EVAL/report.json`` (a clear error when it is missing or corrupt)."""
    report = read_json(Path(eval_dir) / REPORT_FILE, "eval report")
    if not isinstance(report, dict) or "models" not in report:
        raise UsaeError(f"{Path(eval_dir) / REPORT_FILE} is not a usae eval report")
    return EvalReport(report)


def check_eval_of_run(eval_dir: str | Path, run: str | Path, models: list[str],
                      n_concepts: int, need: tuple[str, ...] = EVAL_FILES) -> EvalReport:
    """The report of ``eval_dir``, once it is known to be an eval of ``run``: its files are
    there, and its recorded weights digest is the run's (or, for evals written before the
    record existed, its models and concept count are the run's, with a warning)."""
    eval_dir = Path(eval_dir)
    for name in need:
        if not (eval_dir / name).exists():
            raise UsaeError(f"{eval_dir} lacks {name} — make an eval of this run with: usae "
                            f"eval {run} --store STORE --out {eval_dir}")
    report = read_report(eval_dir)
    again = f" — make an eval of this run with: usae eval {run} --store STORE --out DIR"
    recorded_n = report.n_concepts if report.n_concepts is not None else n_concepts
    if report.models != list(models) or recorded_n != int(n_concepts):
        raise UsaeError(f"{eval_dir} is an eval of another run (models {report.models}, "
                        f"{report.n_concepts} concepts; this run: {list(models)}, "
                        f"{n_concepts}){again}")
    recorded = report.run
    if recorded is None or "weights_sha256" not in recorded:
        log.warning("warning: %s does not record which run it evaluated (an older eval); its "
                    "models and concept count match %s", eval_dir, run)
        return report
    if recorded["weights_sha256"] != weights_digest(run):
        raise UsaeError(f"{eval_dir} is an eval of another run ({recorded.get('path')}, step "
                        f"{recorded.get('step')}): its weights differ from {run}'s{again}")
    return report


def read_concepts(eval_dir: str | Path) -> list[dict[str, str]]:
    """``EVAL/concepts.csv``: one dict of strings per concept, in concept order."""
    path = Path(eval_dir) / CONCEPTS_FILE
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError as err:
        raise UsaeError(f"cannot read {path}: {err.strerror or err} — make it with `usae eval`"
                        ) from None


def by_energy(rows: list[dict[str, str]], universal_only: bool = False) -> list[dict[str, str]]:
    """Concept rows, most energetic first (``universal_only``: the universal class alone)."""
    pool = [r for r in rows if r["class"] == "universal"] if universal_only else rows
    return sorted(pool, key=lambda r: -float(r["energy"]))


def universal_first(rows: list[dict[str, str]]) -> list[int]:
    """Concept ids to show first: the universal ones by energy, then the rest that fire."""
    ranked = by_energy(rows)
    return ([int(r["concept"]) for r in ranked if r["class"] == "universal"]
            + [int(r["concept"]) for r in ranked if r["class"] != "universal"
               and float(r["energy"]) > 0])
