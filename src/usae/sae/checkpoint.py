"""The trainer's state in one safetensors file: weights, Adam moments, RNG and position.

``RUN/checkpoint.safetensors`` holds tensors named ``model.*``, ``opt.<model>.<param>.<key>``,
``rng.*`` and ``since_fired``; its metadata holds the position (step, schedule counters,
tokens, elapsed seconds) and the run's config as JSON. It is written atomically, so a kill at
any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from usae.config import RunConfig
from usae.errors import ConfigMismatch, UsaeError
from usae.files import atomic_save_safetensors, load_safetensors

# Keys that may change between a run and its resume without changing its maths.
RESUMABLE_KEYS = {"log_every", "checkpoint_every", "checkpoint_minutes", "eval_every",
                  "eval_batches", "device", "tensorboard", "wandb", "keep_freed_memory",
                  "fused_optimizer"}  # the same update: only its rounding differs


class Checkpoint(NamedTuple):
    """A checkpoint read back: its config, position and tensors."""

    config: RunConfig
    position: dict[str, Any]
    tensors: dict[str, Tensor]


def optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """An optimizer's per-parameter state as flat named tensors."""
    out = {}
    for p_idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{name}.{p_idx}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                   device: torch.device) -> None:
    """Restore what ``optimizer_tensors`` saved (moments on ``device``, step counts on CPU)."""
    sd = opt.state_dict()
    prefix = f"opt.{name}."
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            p_idx, field = key[len(prefix):].split(".", 1)
            state.setdefault(int(p_idx), {})[field] = value if field == "step" else \
                value.to(device)
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(path: Path, tensors: dict[str, Tensor], position: dict[str, Any],
                    cfg: RunConfig) -> None:
    """Write the checkpoint atomically."""
    meta = {"position": json.dumps(position), "config": json.dumps(cfg.to_json())}
    atomic_save_safetensors(path, tensors, metadata=meta)


def check_resumable(saved: RunConfig, now: RunConfig) -> None:
    """The one rule for a resume: ``now`` may differ from the checkpoint's ``saved`` config
    only in ``RESUMABLE_KEYS``; anything else raises ``ConfigMismatch`` naming each key."""
    now_sae, old_sae = asdict(now.sae), asdict(saved.sae)
    now_t, old_t = asdict(now.train), asdict(saved.train)
    diffs = [f"{key}: {old_sae.get(key)!r} -> {now_sae[key]!r}"
             for key in now_sae if now_sae[key] != old_sae.get(key)]
    diffs += [f"{key}: {old_t.get(key)!r} -> {now_t[key]!r}" for key in now_t
              if key not in RESUMABLE_KEYS and now_t[key] != old_t.get(key)]
    if diffs:
        raise ConfigMismatch("cannot resume with a different config (" + "; ".join(diffs) +
                             ") — drop those options, or train into a new folder")


def read_checkpoint_config(path: Path) -> RunConfig:
    """Only the config of a checkpoint (cheap: reads the header)."""
    return _read_meta(path)[0]


def read_checkpoint_position(path: Path) -> dict[str, Any]:
    """Only the position (step, tokens...) of a checkpoint (reads the header)."""
    return _read_meta(path)[1]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing or damaged file is a clear error."""
    cfg, position = _read_meta(path)
    return Checkpoint(cfg, position, load_safetensors(path))


def _read_meta(path: Path) -> tuple[RunConfig, dict[str, Any]]:
    from safetensors import safe_open

    if not path.exists():
        raise UsaeError(f"no {path.name} in {path.parent}: nothing to resume")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        return RunConfig.from_json(json.loads(meta["config"])), json.loads(meta["position"])
    except UsaeError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors and json raise several types
        raise UsaeError(f"checkpoint {path} is corrupt ({err}); delete the run folder and "
                        "train again") from None
