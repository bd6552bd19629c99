"""The run folder: its file names, its config, its weights, and whether it is finished.

Layout of ``RUN/``::

    config.json             the RunConfig, the store it was trained on, and ``status``
    model.safetensors       inference weights (encoders, dictionaries, standardization)
    checkpoint.safetensors  weights + optimizer moments + RNG + position (training only)
    metrics.jsonl           one JSON object per logged step
    independent.json        marks a folder of independent SAEs (one sub-run per model)

``status`` is ``{"state": "partial" | "final", "step": s, "total_steps": T}``. It is written
last at every save, so a run is *final* only once its last save has fully landed; commands
that read a partial run warn and say which step its weights hold. Runs written before the
marker existed (no ``status``) count as final.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from usae.config import RunConfig
from usae.errors import UsaeError
from usae.files import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    read_json,
    remove_stale_temps,
)

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
INDEPENDENT_FILE = "independent.json"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, METRICS_FILE)


def read_run_json(run: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a run (RunConfig keys plus ``store`` and ``status``)."""
    path = Path(run) / CONFIG_FILE
    if not path.exists():
        raise UsaeError(f"{run} is not a usae run: {CONFIG_FILE} is missing")
    obj = read_json(path, "run config")
    if not isinstance(obj, dict):
        raise UsaeError(f"{path} is corrupt: expected a JSON object")
    return obj


def read_config(run: str | Path) -> RunConfig:
    """The run's ``RunConfig``."""
    return RunConfig.from_json(read_run_json(run))


def write_config(run: str | Path, cfg: RunConfig, status: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` atomically: the config, ``extra`` keys, then ``status``."""
    atomic_write_json(Path(run) / CONFIG_FILE, {**cfg.to_json(), **(extra or {}),
                                                "status": status})


def final_status(step: int = 0, total_steps: int = 0) -> dict[str, Any]:
    return {"state": "final", "step": step, "total_steps": total_steps}


def partial_status(step: int, total_steps: int) -> dict[str, Any]:
    return {"state": "partial", "step": step, "total_steps": total_steps}


def run_status(run: str | Path) -> dict[str, Any]:
    """The run's status; runs without one (older versions, imports) are final."""
    status = read_run_json(run).get("status")
    return status if isinstance(status, dict) and "state" in status else final_status()


def is_final(run: str | Path) -> bool:
    """True for a finished run; False when partial or when config.json is missing."""
    try:
        return run_status(run)["state"] == "final"
    except UsaeError:
        return False


def warn_if_partial(run: str | Path) -> None:
    """Log a warning when a run's weights are those of an unfinished training."""
    status = run_status(run)
    if status["state"] != "final":
        log.warning("warning: %s is a partial run: its weights are from step %s of %s "
                    "(training was interrupted; `usae train --resume` finishes it)",
                    run, status.get("step"), status.get("total_steps"))


def store_record(run: str | Path) -> dict[str, Any] | None:
    """What the run recorded about its training store (models' specs, layers, grids)."""
    try:
        record = read_run_json(run).get("store")
    except UsaeError:
        return None
    return record if isinstance(record, dict) else None


def save_weights(run: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Write ``model.safetensors`` atomically."""
    atomic_save_safetensors(Path(run) / WEIGHTS_FILE, state)


def load_weights(run: str | Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (safetensors only: nothing is unpickled)."""
    return load_safetensors(Path(run) / WEIGHTS_FILE)


def has_run_files(path: str | Path) -> bool:
    """True when the folder holds any file a training run writes."""
    path = Path(path)
    return any((path / name).exists() for name in (*RUN_FILES, INDEPENDENT_FILE))


def prepare_folder(out: Path, resume: bool, force: bool) -> None:
    """Before training: ``resume`` needs a checkpoint; otherwise a folder that holds anything
    is refused unless ``force`` (which removes only the files a run writes)."""
    remove_stale_temps(out)
    if resume:
        if not (out / CHECKPOINT_FILE).exists():
            raise UsaeError(f"--resume: {out} has no {CHECKPOINT_FILE} to resume from — train "
                            "without --resume to start it")
        return
    if out.exists() and not out.is_dir():
        raise UsaeError(f"{out} is a file, not a folder — choose another --out")
    if out.exists() and any(out.iterdir()) and not force:
        if has_run_files(out) and not (out / CHECKPOINT_FILE).exists():
            raise UsaeError(f"{out} holds a run that was stopped before its first checkpoint "
                            "— pass --force to start it again, or choose another --out")
        what = "holds a run" if has_run_files(out) else "exists and is not empty"
        raise UsaeError(f"{out} {what} — pass --resume to continue it, --force to replace it, "
                        "or choose another --out")
    if force:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (the checkpoint): they will be recomputed."""
    path = out / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is stale too
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def check_run_matches_store(run: str | Path, models: tuple[str, ...], dims: tuple[int, ...],
                            store: Any) -> None:
    """A run of ``models`` with widths ``dims`` read against a ``Store``: errors for other
    models or widths; a warning for another layer, grid, spec or CLS choice than the run's
    store record."""
    if tuple(store.models) != tuple(models):
        raise UsaeError(f"the run has models {list(models)} but the store has "
                        f"{list(store.models)} — evaluate on a store cached with the same models")
    for m, d_run, d_store in zip(models, dims, store.dims):
        if d_run != d_store:
            raise UsaeError(f"model {m!r}: the run has d={d_run} but the store has d={d_store}")
    recorded = (store_record(run) or {}).get("models")
    if not recorded:
        return
    for m in models:
        now, was = store.model(m).info, recorded.get(m, {})
        for key in ("layer", "aligned_grid", "spec", "keep_cls", "prefix_tokens"):
            if key in was and key in now and was[key] != now[key]:
                log.warning("warning: model %r was trained with %s=%r but the store has %r",
                            m, key, was[key], now[key])
