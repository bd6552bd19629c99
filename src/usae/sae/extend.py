"""``usae train --extend RUN``: add a store's new models to a trained universal SAE, keeping
its concept space.

The run's encoders, dictionaries and standardization are copied and frozen
(``frozen_models``: no gradient, no optimizer, BatchNorm statistics kept), so they are
bit-identical in the new run. Each new model gets an encoder, a dictionary and its
standardization, trained by the universal step: when a frozen model is the source, its
codes train the new dictionary to decode them; when the new model is the source, its code
must reconstruct every model through the frozen dictionaries, so its encoder learns to
produce the existing concepts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from usae.analysis.eval_folder import weights_digest
from usae.config import DATA_KEYS, RunConfig, load_config_file, parse_set, resolve
from usae.data.sources import StoreSource
from usae.distributed import Dist
from usae.errors import UsaeError
from usae.files import atomic_write_json
from usae.hub import local_run
from usae.sae import run as run_folder
from usae.sae.model import UniversalSAE
from usae.sae.training import train_from_store, train_run
from usae.store.store import Store, earlier_hashes

log = logging.getLogger(__name__)


def extend_run(run: str | Path, store_path: str | Path, out: str | Path, *,
               config_file: str | None = None, sets: list[str] | None = None,
               keys: dict[str, Any] | None = None, max_steps: int | None = None,
               device: str | None = None, resume: bool = False, force: bool = False,
               split: str = "train", progress: bool = True, dist: Dist | None = None,
               preset: str | None = None, finetune: bool = False) -> dict[str, Any]:
    """Train the models of ``store_path`` that ``run`` lacks into ``out``, with the run's
    own models frozen; returns the training summary. ``finetune``: the step after an
    extension: every weight of ``run`` (which has every model of the store) is copied and
    trained, and ``out/concept_drift.json`` says how far each model's concepts moved.
    ``--resume`` continues ``out`` as any run (its config names the frozen models)."""
    if resume:
        summary = train_from_store(store_path, out, config_file=config_file, sets=sets,
                                   keys=keys, max_steps=max_steps, device=device, resume=True,
                                   force=force, split=split, progress=progress, dist=dist)
        if finetune and (dist is None or dist.is_main):
            summary["concept_drift"] = write_drift(UniversalSAE.load(local_run(run)),
                                                   UniversalSAE.load(out), Path(out))
        return summary
    if preset is not None:
        raise UsaeError("--extend keeps the run's own config; give single keys (--lr, "
                        "--max-steps...) instead of --preset")
    source_dir = local_run(run)
    old_cfg = run_folder.read_config(source_dir)
    store = Store(store_path)
    new = check_extendable(source_dir, old_cfg, store, finetune)
    overrides: dict[str, Any] = {k: v for k, v in asdict(old_cfg.sae).items()
                                 if k not in DATA_KEYS}
    overrides.update(asdict(old_cfg.train))
    if config_file:
        overrides.update(load_config_file(config_file))
    overrides.update({**parse_set(sets or []), **(keys or {})})
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if device:
        overrides["device"] = device
    overrides["frozen_models"] = () if finetune else tuple(old_cfg.sae.models)
    cfg = replace(resolve(store.models, store.dims, "paper", overrides), preset=old_cfg.preset)
    old_sae = UniversalSAE.load(source_dir)
    log.info("%s %s -> %s", "fine-tuning every model of" if finetune else "extending", run,
             out)
    record = {"split": split, "extended_from": {
        "run": str(run), "step": run_folder.run_status(source_dir).get("step"),
        "weights_sha256": weights_digest(source_dir), "added": new, "finetune": finetune,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    val = StoreSource(store, "val") if cfg.train.eval_every and "val" in store.splits() \
        else None
    summary = train_run(cfg, StoreSource(store, split=split), out, val_source=val,
                        force=force, progress=progress, store_manifest=store.manifest,
                        dist=dist, extra=record, initial_state=old_sae.state_dict())
    if finetune and (dist is None or dist.is_main):
        summary["concept_drift"] = write_drift(old_sae, UniversalSAE.load(out), Path(out))
    return summary


DRIFT_FILE = "concept_drift.json"


def concept_drift(before: UniversalSAE, after: UniversalSAE) -> dict[str, dict[str, float]]:
    """Per model: how far its concepts moved, as the cosine of each dictionary row before and
    after (mean, and the fraction of concepts below 0.9)."""
    out = {}
    for m in before.models:
        cos = torch.nn.functional.cosine_similarity(before.normalized_dict(m).detach(),
                                                    after.normalized_dict(m).detach(), dim=1)
        out[m] = {"mean_cosine": round(float(cos.mean()), 4),
                  "moved_fraction": round(float((cos < 0.9).float().mean()), 4)}
    return out


def write_drift(before: UniversalSAE, after: UniversalSAE, out: Path) -> dict[str, Any]:
    drift = concept_drift(before, after)
    atomic_write_json(out / DRIFT_FILE, {"measure": "cosine of each concept's dictionary row "
                                         "before and after fine-tuning; moved: below 0.9",
                                         "models": drift})
    return drift


def check_extendable(run: Path, cfg: RunConfig, store: Store, finetune: bool = False
                     ) -> list[str]:
    """The store's models the run lacks, after the checks that make an extension
    meaningful: the run's models are in the store with the same widths, the store holds the
    images the run was trained on, and every new model has its statistics. ``finetune``:
    the run must have every model of the store instead."""
    old = list(cfg.sae.models)
    missing = [m for m in old if m not in store.models]
    if missing:
        raise UsaeError(f"the store lacks the run's model(s) {missing} — extend with a store "
                        "that has them (usae store add-model adds the new ones to it)")
    new = [m for m in store.models if m not in old]
    if finetune and new:
        raise UsaeError(f"--finetune trains a run on its own models, but the store has {new} "
                        "too — extend the run with them first (--extend without --finetune)")
    if not new and not finetune:
        raise UsaeError(f"the store has no model the run lacks (both have {old}) — add one "
                        "with `usae store add-model STORE --models SPEC`")
    for m, d in zip(cfg.sae.models, cfg.sae.dims):
        if store.model(m).d != d:
            raise UsaeError(f"model {m!r}: the run has d={d} but the store has "
                            f"d={store.model(m).d}")
    trained_on = (run_folder.store_record(run) or {}).get("content_hash")
    known = {store.manifest.get("content_hash"), *earlier_hashes(store.manifest)}
    if trained_on and trained_on not in known:
        raise UsaeError(f"the store's images differ from those the run was trained on (its "
                        f"store had content hash {str(trained_on)[:16]}) — add the new model "
                        "to the run's own store with `usae store add-model`")
    if not trained_on:
        log.warning("warning: %s does not record its store, so the images cannot be checked "
                    "to be the ones it was trained on", run)
    stats = store.manifest.get("stats", {})
    lacking = [m for m in new if m not in stats]
    if lacking:
        raise UsaeError(f"the store has no standardization statistics for {lacking} — "
                        "re-create it with usae cache or usae store add-model")
    return new
