"""Training: the paper's universal rule, its named improvements, checkpoints and resume.

One step (``decoder_update=source``, the paper):
  1. sample the source model i from a seeded generator;
  2. z = TopK(ReLU(encoder_i(x_i)));
  3. for every model j: criterion(x_j, z·D_j) + aux_coef · aux term (``usae.sae.step``);
  4. clip model i's gradient norm, step model i's AdamW and its own LR schedule.

The run folder (``usae.sae.run``) is written at every checkpoint: by step count, by wall time,
at the end, and when SIGINT or SIGTERM arrives (after the step in flight), so an interrupted
run always resumes. A folder that already holds a run is never replaced without ``force``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from usae import threads
from usae.analysis.metrics import r2_matrix
from usae.config import RunConfig, TrainConfig
from usae.data.sources import DataSource, n_batches, shard_slice
from usae.distributed import Dist, sync_batch_norms
from usae.errors import UsaeError
from usae.files import json_text
from usae.malloc import keep_freed_memory
from usae.progress import bar as progress_bar
from usae.sae import run as run_folder
from usae.sae.checkpoint import (
    check_resumable,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    read_checkpoint_position,
    save_checkpoint,
)
from usae.sae.interrupts import StopSignals, TrainingInterrupted
from usae.sae.loggers import MetricSinks
from usae.sae.model import UniversalSAE
from usae.sae.step import StepOut, step_loss

log = logging.getLogger(__name__)


def make_optimizer(params: Iterable[nn.Parameter], tc: TrainConfig) -> torch.optim.AdamW:
    """One model's AdamW (``tc.lr``, ``tc.weight_decay``; fused when ``tc.fused_optimizer``)."""
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                             fused=True if tc.fused_optimizer else None)


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
                 extra_config: dict[str, Any] | None = None, dist: Dist | None = None,
                 initial_state: dict[str, Tensor] | None = None) -> None:
        self.cfg = run_cfg
        self.out = Path(out_dir)
        self.dist = dist or Dist()
        self.progress = progress and self.dist.is_main
        self.extra_config = extra_config or {}
        tc = run_cfg.train
        if tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsaeError(f"device {tc.device!r} requested but CUDA is not available — "
                            "use --device cpu")
        self.device = torch.device(self.dist.device(tc.device))
        self.shard = (self.dist.rank, self.dist.world)
        shard_slice(tc.batch_images, self.shard)  # a world size that splits the batch
        self.dist.agree("configs", json.dumps(run_cfg.to_json(), sort_keys=True))
        if tc.keep_freed_memory:
            keep_freed_memory(self.device.type)
        torch.manual_seed(tc.seed)
        self.sae = UniversalSAE(run_cfg.sae).to(self.device)
        if tc.encoder_init == "transpose":
            self.sae.init_encoders_from_dictionaries()
        if self.dist.enabled:
            sync_batch_norms(self.sae)  # the paper normalizes over the whole batch
        # frozen models (--extend) keep their weights: no gradient, no optimizer
        self.initial_state = initial_state
        self.trained = [m for m in self.sae.models if m not in tc.frozen_models]
        for m in tc.frozen_models:
            for p in self.sae.model_parameters(m):
                p.requires_grad_(False)
        self.optimizers = {m: make_optimizer(self.sae.model_parameters(m), tc)
                           for m in self.trained}
        self.model_gen = torch.Generator().manual_seed(tc.seed)
        self.step = 0
        self.total = 0
        self.sched_counts = [0] * len(self.sae.models)
        self.tokens = 0
        self.elapsed = 0.0
        self.since_fired = torch.zeros(run_cfg.sae.n, dtype=torch.long, device=self.device)
        self.last_row: dict[str, Any] = {}
        self.stopping = False  # a stop request, agreed by every rank
        self.saved_step = -1  # the step of the last checkpoint this process wrote

    # -- state --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Checkpoint, weights, then config.json with the status: final at the last step.
        Rank 0 alone writes (every rank holds the same state)."""
        if not self.dist.is_main:
            return
        tensors = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        for m, opt in self.optimizers.items():
            tensors.update(optimizer_tensors(m, opt))
        tensors["rng.model_gen"] = self.model_gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["since_fired"] = self.since_fired
        position = {"step": self.step, "sched_counts": self.sched_counts,
                    "tokens": self.tokens, "elapsed_s": self.elapsed,
                    "threads": torch.get_num_threads()}
        save_checkpoint(self.out / run_folder.CHECKPOINT_FILE, tensors, position, self.cfg)
        run_folder.save_weights(self.out, self.sae.state_dict())
        status = (run_folder.final_status if self.step >= self.total
                  else run_folder.partial_status)(self.step, self.total)
        run_folder.write_config(self.out, self.cfg, status, self.extra_config)
        self.saved_step = self.step

    def load_checkpoint(self) -> None:
        """Restore every piece of state from the run's checkpoint."""
        ckpt = load_checkpoint(self.out / run_folder.CHECKPOINT_FILE)
        check_resumable(ckpt.config, self.cfg)  # (a library caller's config is unchecked)
        tensors = ckpt.tensors
        self.sae.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                                  if k.startswith("model.")})
        for m, opt in self.optimizers.items():
            load_optimizer(m, opt, tensors, self.device)
        self.model_gen.set_state(tensors["rng.model_gen"])
        torch.set_rng_state(tensors["rng.torch"])
        self.since_fired = tensors["since_fired"].to(self.device)
        # (saved_step stays: the checkpoint may have landed without its config.json, so a
        # resumed run writes its final state once, whatever the folder holds)
        self.step = int(ckpt.position["step"])
        self.sched_counts = [int(c) for c in ckpt.position["sched_counts"]]
        self.tokens = int(ckpt.position["tokens"])
        self.elapsed = float(ckpt.position["elapsed_s"])
        if ckpt.position.get("threads") and not threads.user_set():
            # the run's own thread count: the resumed steps round as the first ones did
            torch.set_num_threads(int(ckpt.position["threads"]))
        if self.dist.is_main:
            run_folder.truncate_metrics(self.out, self.step)

    # -- training -----------------------------------------------------------------------
    def _set_standardization(self, source: DataSource) -> None:
        """Statistics of the data; then, for ``--extend``, the frozen models' own weights and
        standardization over them (``initial_state``)."""
        stats = source.stats()
        for m in self.sae.models:
            mean_d, std_d = stats[m].for_mode(self.cfg.sae.standardize)
            self.sae.set_standardization(m, torch.from_numpy(mean_d).float(),
                                         torch.from_numpy(std_d).float())
        if self.initial_state is not None:
            missing, _ = self.sae.load_state_dict(self.initial_state, strict=False)
            frozen = set(self.cfg.train.frozen_models)
            if any(k.split(".")[1] in frozen for k in missing
                   if k.startswith(("encoders.", "dictionaries."))):
                raise UsaeError("internal: the frozen models' weights were not all given")

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
            yield from source.batches(tc.batch_images, tc.seed, epoch, start, tc.shuffle_pairing,
                                      self.shard)
            epoch, start = epoch + 1, 0

    def total_steps(self, source: DataSource) -> int:
        tc = self.cfg.train
        return tc.total_steps(n_batches(source, tc.batch_images))

    def fit(self, source: DataSource, val_source: DataSource | None = None,
            resume: bool = False, force: bool = False) -> UniversalSAE:
        """Train until ``max_steps`` (or ``epochs``); checkpoint on the way and at the end.

        Raises ``TrainingInterrupted`` after saving a checkpoint when SIGINT/SIGTERM arrives.
        """
        per_epoch = self._check_source(source)
        self.total = self.total_steps(source)
        warmup = self.cfg.train.warmup_steps or per_epoch
        main = self.dist.is_main
        if main:
            run_folder.prepare_folder(self.out, resume, force)
        self.dist.barrier()
        threads_before = torch.get_num_threads()  # a resume may take the run's own count
        if resume:
            self.load_checkpoint()
        else:
            self._set_standardization(source)
        sinks = MetricSinks(self.out, self.cfg.train.tensorboard and main,
                            self.cfg.train.wandb and main, self.cfg.to_json())
        try:
            self._loop(source, val_source, per_epoch, warmup, sinks)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise KeyboardInterrupt(self._abort_message()) from None
        finally:
            sinks.close()
            torch.set_num_threads(threads_before)
        if main and self.step >= self.total and self.saved_step != self.step:
            self.save_checkpoint()
        self.dist.barrier()
        return self.sae

    def _abort_message(self) -> str:
        """What a second Ctrl-C (mid-step) left: the last checkpoint, or nothing."""
        try:
            saved = read_checkpoint_position(self.out / run_folder.CHECKPOINT_FILE)["step"]
        except UsaeError:
            return (f"stopped at once at step {self.step}, before the first checkpoint: nothing "
                    "was saved — re-run without --resume (with --force) to start again")
        return (f"stopped at once at step {self.step}; the last checkpoint (step {saved}) was "
                "kept — re-run with --resume to continue from it")

    def _loop(self, source: DataSource, val_source: DataSource | None, per_epoch: int,
              warmup: int, sinks: MetricSinks) -> None:
        tc = self.cfg.train
        bar = progress_bar(total=self.total, initial=self.step, desc="train", unit="step",
                           disable=not self.progress or self.step >= self.total)
        stream = self._stream(source, per_epoch)
        last_save = time.monotonic()
        metrics_path = self.out / run_folder.METRICS_FILE if self.dist.is_main else os.devnull
        with open(metrics_path, "a") as metrics_fh, StopSignals() as stop:
            while self.step < self.total:
                t0 = time.perf_counter()
                out = self.train_step(next(stream), warmup, self.total, stop.received is not None)
                self.elapsed += time.perf_counter() - t0
                if self.step % tc.log_every == 0 or self.step == self.total:
                    row = self._metrics_row(out)
                    if tc.eval_every and val_source is not None and \
                            self.step % tc.eval_every == 0 and self.dist.is_main:
                        row["val_r2"] = self._val_r2(val_source)
                    metrics_fh.write(json_text(row) + "\n")
                    metrics_fh.flush()
                    sinks.log(row)
                    self.last_row = row
                    bar.set_postfix(loss=f"{out.loss:.4f}", refresh=False,
                                    tok_s=f"{self.tokens / max(self.elapsed, 1e-9):,.0f}")
                bar.update(1)
                due = (self.step % tc.checkpoint_every == 0 or self.step == self.total or
                       time.monotonic() - last_save >= 60 * tc.checkpoint_minutes)
                # one process stops after the step in flight; ranks stop where they agreed
                stopping = self.stopping or (stop.received is not None and not self.dist.enabled)
                if due or stopping:
                    metrics_fh.flush()
                    with stop.saving():
                        self.save_checkpoint()
                    last_save = time.monotonic()
                stopping = stopping or stop.pending
                if stopping:
                    bar.close()
                    self.dist.barrier()  # the checkpoint is written before any rank exits
                    raise TrainingInterrupted(self.step, stop.received or "a stop on another rank")
        bar.close()

    def train_step(self, raw: dict[str, Tensor], warmup: int, total: int,
                   stop_requested: bool = False) -> StepOut:
        """One universal step on a raw batch (this rank's slice of it); advances every piece
        of trainer state. Under torchrun, one all-reduce brings the ranks to the same step."""
        tc = self.cfg.train
        models = self.sae.models
        xs = {m: raw[m].to(self.device, torch.float32, non_blocking=True) for m in models}
        finite = torch.stack([torch.isfinite(x).all() for x in xs.values()]).tolist()
        for m, ok in zip(models, finite):  # (one host sync for every model's check)
            if not ok:
                raise UsaeError(f"model {m!r}: non-finite activations in the batch at step "
                                f"{self.step + 1}; the weights were not touched")
        xs = {m: self.sae.standardize(m, x) for m, x in xs.items()}
        source = int(torch.randint(len(models), (1,), generator=self.model_gen))
        self.sae.train()
        for m in self.cfg.train.frozen_models:  # (BatchNorm's running statistics stay put)
            self.sae.encoders[m].eval()
        dead = self.since_fired >= tc.dead_after_tokens if tc.aux == "gao" else None
        loss, out, fired = step_loss(self.sae, xs, source, self.cfg, dead)
        if not math.isfinite(out.loss):  # (the step's scalars are on the host already)
            raise UsaeError(f"the loss became {out.loss} at step {self.step + 1} "
                            f"(source model {models[source]!r}) — lower lr")
        loss.backward()
        stepped = [j for j in (range(len(models)) if tc.decoder_update == "all" else [source])
                   if models[j] not in tc.frozen_models]
        fired, scalars, self.stopping = self.dist.reduce_step(
            [p for j in stepped for p in self.sae.model_parameters(models[j])], fired,
            [out.loss, *out.recon, out.aux, out.l0], stop_requested)
        out = out._replace(loss=scalars[0], recon=scalars[1:-2], aux=scalars[-2], l0=scalars[-1])
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
        n_tokens = xs[models[source]].shape[0] * self.dist.world
        self.since_fired += n_tokens
        self.since_fired.masked_fill_(fired, 0)  # (no host sync, unlike a masked assignment)
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
                "lr": (self.optimizers.get(src) or self.optimizers[self.trained[0]]
                       ).param_groups[0]["lr"], "sched_t": t,  # (a frozen source: the others')
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
