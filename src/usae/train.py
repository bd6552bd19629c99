"""Training: the paper's universal rule, its named improvements, checkpoints and resume.

One step (``decoder_update=source``, the paper):
  1. sample the source model i from a seeded generator;
  2. z = TopK(ReLU(encoder_i(x_i)));
  3. for every model j: criterion(x_j, z·D_j) + aux_coef · aux term (``usae.step``);
  4. clip model i's gradient norm, step model i's AdamW and its own LR schedule.

The run folder (``usae.run``) is written at every checkpoint: by step count, by wall time,
at the end, and when SIGINT or SIGTERM arrives (after the step in flight), so an interrupted
run always resumes. A folder that already holds a run is never replaced without ``force``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from usae import run as run_folder
from usae.checkpoint import (
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    read_checkpoint_config,
    save_checkpoint,
)
from usae.config import RunConfig, load_config_file, parse_set, resolve
from usae.errors import UsaeError
from usae.files import atomic_write_json
from usae.interrupts import StopSignals, TrainingInterrupted
from usae.loggers import MetricSinks
from usae.malloc import keep_freed_memory
from usae.metrics import r2_matrix
from usae.progress import bar as progress_bar
from usae.sae import UniversalSAE
from usae.sources import DataSource, ModelSubset, StoreSource, n_batches
from usae.step import StepOut, step_loss
from usae.store import Store, split_counts

log = logging.getLogger(__name__)
# Keys that may change between a run and its resume without changing its maths.
RESUMABLE_KEYS = {"log_every", "checkpoint_every", "checkpoint_minutes", "eval_every",
                  "eval_batches", "device", "tensorboard", "wandb", "keep_freed_memory"}


def lr_at(t: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup from ``floor`` over ``warmup`` steps, then cosine down to ``floor``."""
    if t < warmup:
        return floor + (peak - floor) * t / max(warmup, 1)
    span = max(total - warmup, 1)
    progress = min((t - warmup) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Trains a universal SAE from a ``DataSource`` into a run folder, with resume.

    Every piece of state lives in ``checkpoint.safetensors`` (weights, optimizer moments,
    RNG state and position), so a killed run resumes to exactly the losses of an
    uninterrupted one.
    """

    def __init__(self, run_cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.cfg = run_cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.extra_config = extra_config or {}
        tc = run_cfg.train
        if tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsaeError(f"device {tc.device!r} requested but CUDA is not available — "
                            "use --device cpu")
        self.device = torch.device(tc.device)
        if tc.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(tc.seed)
        self.sae = UniversalSAE(run_cfg.sae).to(self.device)
        self.optimizers = {m: torch.optim.AdamW(self.sae.model_parameters(m), lr=tc.lr,
                                                weight_decay=tc.weight_decay)
                           for m in self.sae.models}
        self.model_gen = torch.Generator().manual_seed(tc.seed)
        self.step = 0
        self.total = 0
        self.sched_counts = [0] * len(self.sae.models)
        self.tokens = 0
        self.elapsed = 0.0
        self.since_fired = torch.zeros(run_cfg.sae.n, dtype=torch.long, device=self.device)
        self.last_row: dict[str, Any] = {}

    # -- state --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Checkpoint, weights, then config.json with the status: final at the last step."""
        tensors = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        for m, opt in self.optimizers.items():
            tensors.update(optimizer_tensors(m, opt))
        tensors["rng.model_gen"] = self.model_gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["since_fired"] = self.since_fired
        position = {"step": self.step, "sched_counts": self.sched_counts,
                    "tokens": self.tokens, "elapsed_s": self.elapsed}
        save_checkpoint(self.out / run_folder.CHECKPOINT_FILE, tensors, position, self.cfg)
        run_folder.save_weights(self.out, self.sae.state_dict())
        status = (run_folder.final_status if self.step >= self.total
                  else run_folder.partial_status)(self.step, self.total)
        run_folder.write_config(self.out, self.cfg, status, self.extra_config)

    def load_checkpoint(self) -> None:
        """Restore every piece of state from the run's checkpoint."""
        ckpt = load_checkpoint(self.out / run_folder.CHECKPOINT_FILE)
        self._check_same_config(ckpt.config)
        tensors = ckpt.tensors
        self.sae.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                                  if k.startswith("model.")})
        for m, opt in self.optimizers.items():
            load_optimizer(m, opt, tensors, self.device)
        self.model_gen.set_state(tensors["rng.model_gen"])
        torch.set_rng_state(tensors["rng.torch"])
        self.since_fired = tensors["since_fired"].to(self.device)
        self.step = int(ckpt.position["step"])
        self.sched_counts = [int(c) for c in ckpt.position["sched_counts"]]
        self.tokens = int(ckpt.position["tokens"])
        self.elapsed = float(ckpt.position["elapsed_s"])
        run_folder.truncate_metrics(self.out, self.step)

    def _check_same_config(self, saved: RunConfig) -> None:
        now_sae, old_sae = asdict(self.cfg.sae), asdict(saved.sae)
        now_t, old_t = asdict(self.cfg.train), asdict(saved.train)
        diffs = [f"{key}: {old_sae.get(key)!r} -> {now_sae[key]!r}"
                 for key in now_sae if now_sae[key] != old_sae.get(key)]
        diffs += [f"{key}: {old_t.get(key)!r} -> {now_t[key]!r}" for key in now_t
                  if key not in RESUMABLE_KEYS and now_t[key] != old_t.get(key)]
        if diffs:
            raise UsaeError("cannot resume with a different config (" + "; ".join(diffs) +
                            ") — drop those options, or train into a new folder")

    # -- training -----------------------------------------------------------------------
    def _set_standardization(self, source: DataSource) -> None:
        stats = source.stats()
        for m in self.sae.models:
            mean_d, std_d = stats[m].for_mode(self.cfg.sae.standardize)
            self.sae.set_standardization(m, torch.from_numpy(mean_d).float(),
                                         torch.from_numpy(std_d).float())

    def _check_source(self, source: DataSource) -> int:
        """Checks models and dims; returns the number of full batches per epoch."""
        if tuple(source.models) != self.sae.models:
            raise UsaeError(f"data has models {list(source.models)} but the config has "
                            f"{list(self.sae.models)}")
        for m, d_src, d_cfg in zip(self.sae.models, source.dims, self.cfg.sae.dims):
            if d_src != d_cfg:
                raise UsaeError(f"model {m!r}: data has d={d_src} but the config has d={d_cfg}")
        per_epoch = n_batches(source, self.cfg.train.batch_images)
        if per_epoch == 0:
            raise UsaeError(f"the training data has {source.n_images()} images, fewer than one "
                            f"batch of {self.cfg.train.batch_images} — lower batch_images")
        return per_epoch

    def _stream(self, source: DataSource, per_epoch: int) -> Iterator[dict[str, Tensor]]:
        tc = self.cfg.train
        epoch, start = divmod(self.step, per_epoch)
        while True:
            yield from source.batches(tc.batch_images, tc.seed, epoch, start, tc.shuffle_pairing)
            epoch, start = epoch + 1, 0

    def total_steps(self, source: DataSource) -> int:
        tc = self.cfg.train
        return tc.max_steps or tc.epochs * n_batches(source, tc.batch_images)

    def fit(self, source: DataSource, val_source: DataSource | None = None,
            resume: bool = False, force: bool = False) -> UniversalSAE:
        """Train until ``max_steps`` (or ``epochs``); checkpoint on the way and at the end.

        Raises ``TrainingInterrupted`` after saving a checkpoint when SIGINT/SIGTERM arrives.
        """
        per_epoch = self._check_source(source)
        self.total = self.total_steps(source)
        warmup = self.cfg.train.warmup_steps or per_epoch
        run_folder.prepare_folder(self.out, resume, force)
        if resume:
            self.load_checkpoint()
        else:
            self._set_standardization(source)
        sinks = MetricSinks(self.out, self.cfg.train.tensorboard, self.cfg.train.wandb,
                            self.cfg.to_json())
        try:
            self._loop(source, val_source, per_epoch, warmup, sinks)
        finally:
            sinks.close()
        if self.step >= self.total and not run_folder.is_final(self.out):
            self.save_checkpoint()
        return self.sae

    def _loop(self, source: DataSource, val_source: DataSource | None, per_epoch: int,
              warmup: int, sinks: MetricSinks) -> None:
        tc = self.cfg.train
        bar = progress_bar(total=self.total, initial=self.step, desc="train", unit="step",
                           disable=not self.progress or self.step >= self.total)
        stream = self._stream(source, per_epoch)
        last_save = time.monotonic()
        with open(self.out / run_folder.METRICS_FILE, "a") as metrics_fh, \
                StopSignals() as stop:
            while self.step < self.total:
                t0 = time.perf_counter()
                out = self.train_step(next(stream), warmup, self.total)
                self.elapsed += time.perf_counter() - t0
                if self.step % tc.log_every == 0 or self.step == self.total:
                    row = self._metrics_row(out)
                    if tc.eval_every and val_source is not None and self.step % tc.eval_every == 0:
                        row["val_r2"] = self._val_r2(val_source)
                    metrics_fh.write(json.dumps(row) + "\n")
                    metrics_fh.flush()
                    sinks.log(row)
                    self.last_row = row
                    bar.set_postfix(loss=f"{out.loss:.4f}", refresh=False,
                                    tok_s=f"{self.tokens / max(self.elapsed, 1e-9):,.0f}")
                bar.update(1)
                due = (self.step % tc.checkpoint_every == 0 or self.step == self.total or
                       time.monotonic() - last_save >= 60 * tc.checkpoint_minutes)
                if due or stop.received:
                    metrics_fh.flush()
                    self.save_checkpoint()
                    last_save = time.monotonic()
                if stop.received:
                    bar.close()
                    raise TrainingInterrupted(self.step, stop.received)
        bar.close()

    def train_step(self, raw: dict[str, Tensor], warmup: int, total: int) -> StepOut:
        """One universal step on a raw batch; advances every piece of trainer state."""
        tc = self.cfg.train
        models = self.sae.models
        xs = {}
        for m in models:
            x = raw[m].to(self.device, torch.float32, non_blocking=True)
            if not torch.isfinite(x).all():
                raise UsaeError(f"model {m!r}: non-finite activations in the batch at step "
                                f"{self.step + 1}; the weights were not touched")
            xs[m] = self.sae.standardize(m, x)
        source = int(torch.randint(len(models), (1,), generator=self.model_gen))
        self.sae.train()
        dead = self.since_fired >= tc.dead_after_tokens if tc.aux == "gao" else None
        loss, out, fired = step_loss(self.sae, xs, source, self.cfg, dead)
        if not torch.isfinite(loss):
            raise UsaeError(f"the loss became {float(loss)} at step {self.step + 1} "
                            f"(source model {models[source]!r}) — lower lr")
        loss.backward()
        stepped = range(len(models)) if tc.decoder_update == "all" else [source]
        for j in stepped:
            m = models[j]
            params = [p for p in self.sae.model_parameters(m) if p.grad is not None]
            if tc.grad_clip > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            t = self.step if tc.schedule == "global" else self.sched_counts[j]
            for group in self.optimizers[m].param_groups:
                group["lr"] = lr_at(t, warmup, total, tc.lr, tc.min_lr)
            self.optimizers[m].step()
        if tc.schedule == "per_model":
            # The reference steps a model's scheduler only when that model is sampled
            # (for decoder_update=all too: the schedule follows the source model).
            self.sched_counts[source] += 1
        self.sae.zero_grad(set_to_none=True)
        n_tokens = xs[models[source]].shape[0]
        self.since_fired += n_tokens
        self.since_fired[fired] = 0
        self.tokens += n_tokens
        self.step += 1
        return out

    def _metrics_row(self, out: StepOut) -> dict[str, Any]:
        models = self.sae.models
        tc = self.cfg.train
        src = models[out.source]
        t = self.step - 1 if tc.schedule == "global" else self.sched_counts[out.source] - 1
        return {"step": self.step, "loss": out.loss, "tokens": self.tokens,
                "elapsed_s": round(self.elapsed, 4), "source": src,
                "recon": dict(zip(models, out.recon)), "aux": out.aux, "l0": out.l0,
                "lr": self.optimizers[src].param_groups[0]["lr"], "sched_t": t,
                "dead_fraction": float((self.since_fired >= tc.dead_after_tokens).float().mean())}

    def _val_r2(self, val_source: DataSource) -> list[list[float]]:
        tc = self.cfg.train
        bs = min(tc.batch_images, max(val_source.n_images(), 1))
        batches = val_source.batches(bs, tc.seed, 0)
        limited = (b for b, _ in zip(batches, range(tc.eval_batches)))
        return np.round(r2_matrix(self.sae, limited).r2(), 5).tolist()

    def summary(self) -> dict[str, Any]:
        """Steps, tokens, time and the last logged losses (and held-out R² if measured)."""
        row = self.last_row
        return {"run": str(self.out), "steps": self.step, "total_steps": self.total,
                "tokens": self.tokens, "elapsed_s": round(self.elapsed, 2),
                "tokens_per_s": round(self.tokens / max(self.elapsed, 1e-9)),
                "loss": row.get("loss"), "recon": row.get("recon"), "val_r2": row.get("val_r2")}


# ---- the API the CLI calls --------------------------------------------------------------
def resolve_run_config(models: tuple[str, ...], dims: tuple[int, ...], out: str | Path,
                       preset: str = "paper", config_file: str | None = None,
                       sets: list[str] | None = None, max_steps: int | None = None,
                       device: str | None = None, resume: bool = False) -> RunConfig:
    """Preset, then ``--config``, then ``--set``. With ``resume`` the run's own config (from
    its checkpoint) is the base, so only the keys given again are compared with it."""
    overrides: dict[str, Any] = {}
    old = None
    if resume:
        old = read_checkpoint_config(Path(out) / run_folder.CHECKPOINT_FILE)
        overrides.update({k: v for k, v in asdict(old.sae).items() if k not in ("models", "dims")})
        overrides.update(asdict(old.train))
        preset = "paper"  # the saved values already include their preset's; no second layer
    if config_file:
        overrides.update(load_config_file(config_file))
    overrides.update(parse_set(sets or []))
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if device:
        overrides["device"] = device
    cfg = resolve(tuple(models), tuple(dims), preset, overrides)
    return replace(cfg, preset=old.preset) if old is not None else cfg


def train_from_store(store_path: str | Path, out: str | Path, *, preset: str = "paper",
                     config_file: str | None = None, sets: list[str] | None = None,
                     max_steps: int | None = None, device: str | None = None,
                     resume: bool = False, force: bool = False, split: str = "train",
                     independent: bool = False, progress: bool = True) -> dict[str, Any]:
    """``usae train``: resolve the config, train on a store split, return a summary."""
    store = Store(store_path)
    cfg = resolve_run_config(store.models, store.dims, out, preset, config_file, sets,
                             max_steps, device, resume)
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
                     store_manifest=store.manifest)


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
              store_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a universal SAE (or, with ``independent``, one ordinary TopK SAE per model, each
    in ``RUN/<model>/`` with the same n, k and data); returns the training summary."""
    extra = _store_extra(store_manifest)
    if not independent:
        trainer = Trainer(cfg, out_dir, progress=progress, extra_config=extra)
        trainer.fit(source, val_source, resume=resume, force=force)
        return trainer.summary()
    out = Path(out_dir)
    if not resume and out.exists() and any(out.iterdir()):
        if not force:
            raise UsaeError(f"{out} exists and is not empty — pass --resume to continue it, "
                            "--force to replace it, or choose another --out")
        (out / run_folder.INDEPENDENT_FILE).unlink(missing_ok=True)  # and, below, run files
    summaries = {}
    for m, d in zip(cfg.sae.models, cfg.sae.dims):
        sub_cfg = replace(cfg, sae=replace(cfg.sae, models=(m,), dims=(d,),
                                           n_concepts=cfg.sae.n))
        log.info("independent SAE for %s", m)
        trainer = Trainer(sub_cfg, out / m, progress=progress, extra_config=extra)
        trainer.fit(ModelSubset(source, (m,)),
                    ModelSubset(val_source, (m,)) if val_source else None, resume=resume,
                    force=force)
        summaries[m] = trainer.summary()
    atomic_write_json(out / run_folder.INDEPENDENT_FILE, {"models": list(cfg.sae.models),
                                                          "config": cfg.to_json(), **extra})
    return {"run": str(out), "independent": summaries}
