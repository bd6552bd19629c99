"""Training: the paper's universal rule, its named improvements, checkpoints and resume.

One step (``decoder_update=source``, the paper):
  1. sample the source model i from a seeded generator;
  2. z = TopK(ReLU(encoder_i(x_i)));
  3. for every model j: criterion(x_j, z·D_j) + aux_coef · aux term;
  4. clip model i's gradient norm, step model i's AdamW and its own LR schedule.

Gradients for decoders that will not be stepped are never computed (the reference computes
and discards them), the main decode gathers the k active rows instead of a dense matmul, and
the auxiliary top-n/2 set is found by partial selection once per step. The maths is the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae import losses
from usae.fused import multi_decode, paired_criterion, topk_reference_aux_decode
from usae.config import RunConfig
from usae.data import DataSource, n_batches
from usae.errors import UsaeError
from usae.io import atomic_save_safetensors, load_safetensors
from usae.sae import UniversalSAE, normalize_rows, sparse_decode

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
# Keys that may change between a run and its resume without changing its maths.
RESUMABLE_KEYS = {"log_every", "checkpoint_every", "eval_every", "eval_batches", "device",
                  "tensorboard", "wandb", "keep_freed_memory"}


class StepOut(NamedTuple):
    """One training step's scalars: total loss and the per-decoder reconstruction terms."""

    loss: float
    source: int
    recon: list[float]
    aux: float
    l0: float


def step_loss(sae: UniversalSAE, xs: dict[str, Tensor], source: int, cfg: RunConfig,
              dead_c: Tensor | None = None) -> tuple[Tensor, StepOut, Tensor]:
    """Loss of one universal step on standardized batches ``xs`` (each (N, d_j)).

    Returns (loss, scalars, fired_c) where ``fired_c`` marks concepts that fired in the batch.
    """
    tc = cfg.train
    models = sae.models
    src = models[source]
    trainable = [tc.decoder_update == "all" or j == source for j in range(len(models))]
    dicts = [normalize_rows(sae.dictionaries[m]) if t
             else normalize_rows(sae.dictionaries[m].detach())
             for m, t in zip(models, trainable)]
    widths = [d.shape[1] for d in dicts]

    cat = torch.cat(dicts, dim=1) if len(dicts) > 1 else dicts[0]
    aux_all = None
    if tc.aux == "reference":
        pre_nc = sae.encoders[src](xs[src])
        values_nk, indices_nk, aux_all = topk_reference_aux_decode(pre_nc, cat, sae.cfg.k,
                                                                   widths, trainable)
    else:
        pre_nc, values_nk, indices_nk = sae.encode_standardized(src, xs[src])
        if tc.aux == "gao" and dead_c is not None:
            aux_k = tc.aux_k or min(4 * sae.cfg.k, sae.cfg.n // 2)
            codes = losses.gao_aux_codes(torch.relu(pre_nc), dead_c, aux_k)
            if codes is not None:
                aux_all = multi_decode(codes, cat, widths, trainable)
    xhat_all = torch.cat([sparse_decode(values_nk, indices_nk, d) for d in dicts], dim=1)
    x_all = torch.cat([xs[m] for m in models], dim=1)
    total, recon, aux_parts = paired_criterion(
        x_all, xhat_all, aux_all, widths, tc.aux_coef if aux_all is not None else 0.0,
        squared=tc.criterion == "l2", detach_residual=tc.aux == "gao")
    recon, aux_sum = recon.tolist(), float(aux_parts.sum())
    active_nk = values_nk.detach() > 0
    fired = torch.zeros(sae.cfg.n, dtype=torch.bool, device=indices_nk.device)
    fired[indices_nk[active_nk]] = True
    l0 = float(active_nk.sum(1).float().mean())
    return total, StepOut(float(total.detach()), source, recon, aux_sum, l0), fired


# ---- schedules ----------------------------------------------------------------------------
def lr_at(t: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup from ``floor`` over ``warmup`` steps, then cosine down to ``floor``."""
    if t < warmup:
        return floor + (peak - floor) * t / max(warmup, 1)
    span = max(total - warmup, 1)
    progress = min((t - warmup) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


# ---- optimizer state in safetensors ---------------------------------------------------------
def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for p_idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{name}.{p_idx}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    sd = opt.state_dict()
    prefix = f"opt.{name}."
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            p_idx, field = key[len(prefix):].split(".", 1)
            state.setdefault(int(p_idx), {})[field] = value
    sd["state"] = state
    opt.load_state_dict(sd)


# ---- the trainer ----------------------------------------------------------------------------
class Trainer:
    """Trains a universal SAE from a ``DataSource`` into a run folder, with resume.

    The trainer keeps every piece of state it needs in ``checkpoint.safetensors`` (one atomic
    file: weights, optimizer moments, RNG state and a JSON position), so a killed run resumes
    to exactly the losses of an uninterrupted one.
    """

    def __init__(self, run_cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.cfg = run_cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.extra_config = extra_config or {}
        tc = run_cfg.train
        if tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsaeError(f"device {tc.device!r} requested but CUDA is not available")
        self.device = torch.device(tc.device)
        if tc.keep_freed_memory and self.device.type == "cpu":
            from usae.memory import keep_freed_memory

            keep_freed_memory()
        torch.manual_seed(tc.seed)
        self.sae = UniversalSAE(run_cfg.sae).to(self.device)
        self.optimizers = {m: torch.optim.AdamW(self.sae.model_parameters(m), lr=tc.lr,
                                                weight_decay=tc.weight_decay)
                           for m in self.sae.models}
        self.model_gen = torch.Generator().manual_seed(tc.seed)
        self.step = 0
        self.sched_counts = [0] * len(self.sae.models)
        self.tokens = 0
        self.elapsed = 0.0
        self.since_fired = torch.zeros(run_cfg.sae.n, dtype=torch.long, device=self.device)
        self._writers: list[Any] = []

    # -- state --------------------------------------------------------------------------
    def _position(self) -> dict[str, Any]:
        return {"step": self.step, "sched_counts": self.sched_counts, "tokens": self.tokens,
                "elapsed_s": self.elapsed}

    def save_checkpoint(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        for m, opt in self.optimizers.items():
            tensors.update(_optimizer_tensors(m, opt))
        tensors["rng.model_gen"] = self.model_gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["since_fired"] = self.since_fired
        meta = {"position": json.dumps(self._position()),
                "config": json.dumps(self.cfg.to_json())}
        atomic_save_safetensors(self.out / CHECKPOINT_FILE, tensors, metadata=meta)
        self.sae.save(self.out)  # model.safetensors; config.json below, with the data's origin
        from usae.io import atomic_write_json

        atomic_write_json(self.out / "config.json", {**self.cfg.to_json(), **self.extra_config})

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT_FILE
        if not path.exists():
            raise UsaeError(f"--resume: no {CHECKPOINT_FILE} in {self.out}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            saved_cfg = RunConfig.from_json(json.loads(meta["config"]))
            position = json.loads(meta["position"])
        except UsaeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise UsaeError(f"checkpoint {path} is corrupt: {err}") from None
        self._check_same_config(saved_cfg)
        tensors = load_safetensors(path)
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.sae.load_state_dict(state)
        for m, opt in self.optimizers.items():
            _load_optimizer(m, opt, {k: v.to(self.device) if not k.endswith(".step") else v
                                     for k, v in tensors.items()})
        self.model_gen.set_state(tensors["rng.model_gen"])
        torch.set_rng_state(tensors["rng.torch"])
        self.since_fired = tensors["since_fired"].to(self.device)
        self.step = int(position["step"])
        self.sched_counts = [int(c) for c in position["sched_counts"]]
        self.tokens = int(position["tokens"])
        self.elapsed = float(position["elapsed_s"])
        self._truncate_metrics()

    def _check_same_config(self, saved: RunConfig) -> None:
        diffs = []
        now_sae, old_sae = asdict(self.cfg.sae), asdict(saved.sae)
        for key in now_sae:
            if now_sae[key] != old_sae.get(key):
                diffs.append(f"{key}: {old_sae.get(key)!r} -> {now_sae[key]!r}")
        now_t, old_t = asdict(self.cfg.train), asdict(saved.train)
        for key in now_t:
            if key not in RESUMABLE_KEYS and now_t[key] != old_t.get(key):
                diffs.append(f"{key}: {old_t.get(key)!r} -> {now_t[key]!r}")
        if diffs:
            raise UsaeError("cannot resume with a different config (" + "; ".join(diffs) + ")")

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint: they will be recomputed."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is stale too
        from usae.io import atomic_write_text

        atomic_write_text(path, "".join(k + "\n" for k in kept))

    # -- training -----------------------------------------------------------------------
    def _set_standardization(self, source: DataSource) -> None:
        stats = source.stats()
        for m in self.sae.models:
            mean_d, std_d = stats[m].for_mode(self.cfg.sae.standardize)
            self.sae.set_standardization(m, torch.from_numpy(mean_d).float(),
                                         torch.from_numpy(std_d).float())

    def _check_source(self, source: DataSource) -> None:
        if tuple(source.models) != self.sae.models:
            raise UsaeError(f"data has models {list(source.models)} but the config has "
                            f"{list(self.sae.models)}")
        for m, d_src, d_cfg in zip(self.sae.models, source.dims, self.cfg.sae.dims):
            if d_src != d_cfg:
                raise UsaeError(f"model {m!r}: data has d={d_src} but the config has d={d_cfg}")

    def _stream(self, source: DataSource, per_epoch: int) -> Iterator[dict[str, Tensor]]:
        tc = self.cfg.train
        epoch, start = divmod(self.step, per_epoch)
        while True:
            yield from source.batches(tc.batch_images, tc.seed, epoch, start, tc.shuffle_pairing)
            epoch, start = epoch + 1, 0

    def total_steps(self, source: DataSource) -> int:
        tc = self.cfg.train
        per_epoch = n_batches(source, tc.batch_images)
        return tc.max_steps or tc.epochs * per_epoch

    def fit(self, source: DataSource, val_source: DataSource | None = None,
            resume: bool = False) -> UniversalSAE:
        """Train until ``max_steps`` (or ``epochs``); checkpoint on the way and at the end."""
        tc = self.cfg.train
        self._check_source(source)
        per_epoch = n_batches(source, tc.batch_images)
        if per_epoch == 0:
            raise UsaeError(f"the training data has {source.n_images()} images, fewer than one "
                            f"batch of {tc.batch_images}; lower batch_images")
        total = self.total_steps(source)
        warmup = tc.warmup_steps or per_epoch
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        else:
            self._set_standardization(source)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            (self.out / CHECKPOINT_FILE).unlink(missing_ok=True)
        self._open_writers()
        bar = None
        if self.progress and self.step < total:
            from usae.progress import bar as progress_bar

            bar = progress_bar(total=total, initial=self.step, desc="train", unit="step")
        metrics_fh = open(self.out / METRICS_FILE, "a")
        stream = self._stream(source, per_epoch)
        try:
            while self.step < total:
                t0 = time.perf_counter()
                raw = next(stream)
                out = self.train_step(raw, warmup, total)
                self.elapsed += time.perf_counter() - t0
                if self.step % tc.log_every == 0 or self.step == total:
                    row = self._metrics_row(out)
                    if tc.eval_every and val_source is not None and self.step % tc.eval_every == 0:
                        row["val_r2"] = self._val_r2(val_source)
                    metrics_fh.write(json.dumps(row) + "\n")
                    metrics_fh.flush()
                    self._log_writers(row)
                if self.step % tc.checkpoint_every == 0 or self.step == total:
                    metrics_fh.flush()
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    if self.step % tc.log_every == 0:
                        bar.set_postfix(loss=f"{out.loss:.4f}", refresh=False,
                                        tok_s=f"{self.tokens / max(self.elapsed, 1e-9):,.0f}")
        finally:
            metrics_fh.close()
            if bar is not None:
                bar.close()
            self._close_writers()
        if not (self.out / CHECKPOINT_FILE).exists():
            self.save_checkpoint()
        return self.sae

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
                            f"(source model {models[source]!r}); lower lr")
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
        from usae.metrics import r2_matrix

        tc = self.cfg.train
        bs = min(tc.batch_images, max(val_source.n_images(), 1))
        batches = val_source.batches(bs, tc.seed, 0)
        limited = (b for b, _ in zip(batches, range(tc.eval_batches)))
        return np.round(r2_matrix(self.sae, limited).r2(), 5).tolist()

    # -- optional loggers (lazy, off by default) ----------------------------------------
    def _open_writers(self) -> None:
        tc = self.cfg.train
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsaeError("tensorboard=true needs `pip install tensorboard`") from None
            self._writers.append(("tb", SummaryWriter(str(self.out / "tb"))))
        if tc.wandb:
            try:
                import wandb
            except ImportError:
                raise UsaeError("wandb=true needs `pip install wandb`") from None
            # offline unless the user asks otherwise: no account is ever required
            run = wandb.init(project="usae", dir=str(self.out), config=self.cfg.to_json(),
                             mode=os.environ.get("WANDB_MODE", "offline"))
            self._writers.append(("wandb", run))

    def _log_writers(self, row: dict[str, Any]) -> None:
        for kind, writer in self._writers:
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            if kind == "tb":
                for k, v in scalars.items():
                    writer.add_scalar(k, v, row["step"])
            else:
                writer.log(scalars, step=row["step"])

    def _close_writers(self) -> None:
        for _, writer in self._writers:
            (writer.close if hasattr(writer, "close") else writer.finish)()
        self._writers = []


def train_run(cfg: RunConfig, source: DataSource, out_dir: str | Path,
              val_source: DataSource | None = None, resume: bool = False,
              independent: bool = False, progress: bool = True,
              store_manifest: dict[str, Any] | None = None) -> UniversalSAE | None:
    """Train a universal SAE (or, with ``independent``, one ordinary TopK SAE per model, each
    in ``RUN/<model>/`` with the same n, k and data) and record where the data came from."""
    extra = {}
    if store_manifest is not None:
        extra["store"] = {"content_hash": store_manifest.get("content_hash"),
                          "models": {m: {k: v for k, v in info.items() if k != "stats"}
                                     for m, info in store_manifest["models"].items()}}
    if not independent:
        return Trainer(cfg, out_dir, progress=progress, extra_config=extra).fit(
            source, val_source, resume=resume)
    from dataclasses import replace

    from usae.data import ModelSubset

    out = Path(out_dir)
    for m, d in zip(cfg.sae.models, cfg.sae.dims):
        sub_cfg = replace(cfg, sae=replace(cfg.sae, models=(m,), dims=(d,),
                                           n_concepts=cfg.sae.n))
        log.info("independent SAE for %s", m)
        Trainer(sub_cfg, out / m, progress=progress, extra_config=extra).fit(
            ModelSubset(source, (m,)), ModelSubset(val_source, (m,)) if val_source else None,
            resume=resume)
    from usae.io import atomic_write_json

    atomic_write_json(out / "independent.json", {"models": list(cfg.sae.models),
                                                 "config": cfg.to_json(), **extra})
    return None
