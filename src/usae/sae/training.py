"""``usae train``'s entry points: the config a run resolves to, the data it reads (a store
split, or images streamed through the backbones) and the processes it runs on (``torchrun``).

``Trainer`` (``usae.sae.trainer``) does the training; this module wires it to the command line.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from usae.config import RunConfig, key_value, load_config_file, parse_set, resolve
from usae.data.sources import DataSource, ModelSubset, StoreSource, n_batches
from usae.distributed import Dist
from usae.errors import ConfigMismatch, UsaeError
from usae.files import atomic_write_json
from usae.sae import run as run_folder
from usae.sae.checkpoint import check_resumable, read_checkpoint_config
from usae.sae.trainer import Trainer
from usae.store.store import Store, split_counts

log = logging.getLogger(__name__)


def resume_checkpoint(out: str | Path, models: tuple[str, ...], independent: bool) -> Path:
    """Where a run's checkpoint is: ``RUN/`` or, for ``--independent`` runs (one SAE per
    model, each in ``RUN/<model>/``), the first model's folder (their configs differ only in
    the model)."""
    return Path(out) / (models[0] if independent else "") / run_folder.CHECKPOINT_FILE


def resolve_run_config(models: tuple[str, ...], dims: tuple[int, ...], out: str | Path,
                       preset: str | None = None, config_file: str | None = None,
                       sets: list[str] | None = None, max_steps: int | None = None,
                       device: str | None = None, resume: bool = False,
                       keys: dict[str, Any] | None = None,
                       independent: bool = False) -> RunConfig:
    """Preset (default ``paper``), then ``--config``, then ``--set`` and the training-key
    flags (``keys``: ``{key: value}``; a key given both ways must agree). With ``resume`` the
    run's own config (its checkpoint's, read here once) is the base, so only the keys given
    again are compared with it (``checkpoint.check_resumable``, before any work starts); a
    preset given again must be the run's own."""
    overrides: dict[str, Any] = {}
    old = None
    if resume:
        old = read_checkpoint_config(resume_checkpoint(out, models, independent))
        if preset is not None and preset != old.preset:
            raise ConfigMismatch(f"cannot resume with --preset {preset}: {out} was trained with "
                            f"preset {old.preset!r} — drop --preset, or train into a new folder")
        overrides.update({k: v for k, v in asdict(old.sae).items() if k not in ("models", "dims")})
        overrides.update(asdict(old.train))
        preset = "paper"  # the saved values already include their preset's; no second layer
    if config_file:
        overrides.update(load_config_file(config_file))
    given = parse_set(sets or [])
    for key, value in (keys or {}).items():
        if key in given and key_value(key, given[key]) != key_value(key, value):
            raise UsaeError(f"{key} was given twice, as --set {key}={given[key]} and as "
                            f"--{key.replace('_', '-')} {value} — give it once")
        given[key] = value
    overrides.update(given)
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if device:
        overrides["device"] = device
    cfg = resolve(tuple(models), tuple(dims), preset or "paper", overrides)
    if old is None:
        return cfg
    cfg = replace(cfg, preset=old.preset)
    check_resumable(old, cfg if not independent else _independent_part(cfg, 0))
    return cfg


def _independent_part(cfg: RunConfig, index: int) -> RunConfig:
    """The config of ``--independent``'s SAE for model ``index``: that model alone, with the
    whole run's concept count."""
    m, d = cfg.sae.models[index], cfg.sae.dims[index]
    return replace(cfg, sae=replace(cfg.sae, models=(m,), dims=(d,), n_concepts=cfg.sae.n))


def train_from_store(store_path: str | Path, out: str | Path, *, preset: str | None = None,
                     config_file: str | None = None, sets: list[str] | None = None,
                     keys: dict[str, Any] | None = None,
                     max_steps: int | None = None, device: str | None = None,
                     resume: bool = False, force: bool = False, split: str = "train",
                     independent: bool = False, progress: bool = True,
                     dist: Dist | None = None) -> dict[str, Any]:
    """``usae train``: resolve the config, train on a store split, return a summary.

    Under ``torchrun`` (or with ``dist``), every process runs this with the same arguments;
    each reads its slice of every batch and rank 0 writes the run."""
    store = Store(store_path)
    cfg = resolve_run_config(store.models, store.dims, out, preset, config_file, sets,
                             max_steps, device, resume, keys, independent)
    source = StoreSource(store, split=split)
    val = None
    if cfg.train.eval_every:
        if "val" in store.splits():
            val = StoreSource(store, split="val")
        else:
            log.warning("warning: the store has no val split, so the held-out R2 matrix is "
                        "not logged")
    return train_run(cfg, source, out, val_source=val, resume=resume, force=force,
                     independent=independent, progress=progress,
                     store_manifest=store.manifest, dist=dist, extra={"split": split})


def check_resume_data(out: Path, extra: dict[str, Any]) -> None:
    """``--resume`` continues on the data the run was trained on: the same split, and the same
    store (by content hash) or image source. Runs that did not record them are not checked."""
    try:
        recorded = run_folder.read_run_json(out)
    except UsaeError:
        return  # stopped before its first config.json: the checkpoint's config is checked
    was, now = recorded.get("split"), extra.get("split")
    if was is not None and now is not None and was != now:
        raise UsaeError(f"cannot resume {out} on split {now!r}: it was trained on split "
                        f"{was!r} — drop --split (or pass --split {was})")
    old_id, new_id = _data_identity(recorded), _data_identity(extra)
    if old_id is not None and new_id is not None and old_id != new_id:
        raise UsaeError(f"cannot resume {out} on other data: it was trained on the {old_id[0]} "
                        f"{old_id[1][:16]}, not the {new_id[0]} {new_id[1][:16]} — pass the "
                        "data it was trained on, or train into a new folder")


def _data_identity(record: dict[str, Any]) -> tuple[str, str] | None:
    """What a run trained on: ("store", content hash) or ("images", the source's name)."""
    if (record.get("store") or {}).get("content_hash"):
        return "store with content hash", str(record["store"]["content_hash"])
    if (record.get("stream") or {}).get("source"):
        return "images of", str(record["stream"]["source"])
    return None


SHORT_RUN_STEPS = 50


def warn_if_too_short(cfg: RunConfig, source: DataSource) -> None:
    """A run of a few steps, or one that ends inside its learning-rate warmup, trains a
    model that means nothing; say so before it starts."""
    tc = cfg.train
    per_epoch = n_batches(source, tc.batch_images)
    if per_epoch == 0:
        return  # the trainer refuses it with its own message
    total = tc.total_steps(per_epoch)
    warmup = tc.warmup_steps or per_epoch
    if total <= warmup or total < SHORT_RUN_STEPS:
        log.warning("warning: this run has only %d steps (%d images a batch, %d batches an "
                    "epoch, learning-rate warmup %d steps): too short to give a useful model — "
                    "raise --epochs, --min-steps or --max-steps, or lower batch_images (the "
                    "`demo` preset suits small stores)", total, tc.batch_images, per_epoch,
                    warmup)


def _store_extra(store_manifest: dict[str, Any] | None) -> dict[str, Any]:
    if store_manifest is None:
        return {}
    source = Path(str(store_manifest.get("source") or "")).name or "in-memory arrays"
    splits = split_counts(store_manifest)
    described = (f"{sum(splits.values())} images from {source!r} ("
                 + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) + ")")
    return {"store": {"content_hash": store_manifest.get("content_hash"),
                      "source_description": described,
                      "models": {m: {k: v for k, v in info.items() if k != "stats"}
                                 for m, info in store_manifest["models"].items()}}}


def train_run(cfg: RunConfig, source: DataSource, out_dir: str | Path,
              val_source: DataSource | None = None, resume: bool = False, force: bool = False,
              independent: bool = False, progress: bool = True,
              store_manifest: dict[str, Any] | None = None,
              dist: Dist | None = None, extra: dict[str, Any] | None = None,
              initial_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a universal SAE (or, with ``independent``, one ordinary TopK SAE per model, each
    in ``RUN/<model>/`` with the same n, k and data); returns the training summary.

    ``dist``: the processes to train on; by default the ``torchrun`` job this process belongs
    to, if any (its process group is closed at the end). ``extra``: more keys for the run's
    config.json (where the data came from)."""
    own = dist is None
    dist = dist or Dist.from_env(cfg.train.device)
    record = {**_store_extra(store_manifest), **(extra or {})}
    try:
        if resume:
            check_resume_data(Path(out_dir) / (cfg.sae.models[0] if independent else ""),
                              record)
        warn_if_too_short(cfg, source)
        return _train_run(cfg, source, Path(out_dir), val_source, resume, force, independent,
                          progress, record, dist, initial_state)
    finally:
        if own:
            dist.close()


def _train_run(cfg: RunConfig, source: DataSource, out: Path, val_source: DataSource | None,
               resume: bool, force: bool, independent: bool, progress: bool,
               extra: dict[str, Any], dist: Dist,
               initial_state: dict[str, Any] | None = None) -> dict[str, Any]:
    if not independent:
        trainer = Trainer(cfg, out, progress=progress, extra_config=extra, dist=dist,
                          initial_state=initial_state)
        trainer.fit(source, val_source, resume=resume, force=force)
        return trainer.summary()
    if dist.is_main and not resume:  # (each model's run folder is checked by its trainer)
        run_folder.prepare_folder(out, resume=False, force=force)
        (out / run_folder.INDEPENDENT_FILE).unlink(missing_ok=True)
    summaries = {}
    for i, m in enumerate(cfg.sae.models):
        sub_cfg = _independent_part(cfg, i)
        log.info("independent SAE for %s", m)
        # a resume continues each model from its checkpoint; a model the interrupted run had
        # not checkpointed yet starts over (its folder holds no weights to keep)
        fresh = not any((out / m / name).exists()
                        for name in (run_folder.CHECKPOINT_FILE, run_folder.WEIGHTS_FILE))
        trainer = Trainer(sub_cfg, out / m, progress=progress, extra_config=extra, dist=dist)
        trainer.fit(ModelSubset(source, (m,)),
                    ModelSubset(val_source, (m,)) if val_source else None,
                    resume=resume and not fresh, force=force or (resume and fresh))
        summaries[m] = trainer.summary()
    if dist.is_main:
        atomic_write_json(out / run_folder.INDEPENDENT_FILE,
                          {"models": list(cfg.sae.models), "config": cfg.to_json(), **extra})
    return {"run": str(out), "independent": summaries}
