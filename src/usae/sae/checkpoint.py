"""The trainer's state in one safetensors file: weights, Adam moments, RNG and position.

``RUN/checkpoint.safetensors`` holds tensors named ``model.*``, ``opt.<model>.<param>.<key>``,
``rng.*`` and ``since_fired``; its metadata holds the position (step, schedule counters,
tokens, elapsed seconds) and the run's config as JSON. It is written atomically, so a kill at
any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from usae.config import RunConfig
from usae.errors import UsaeError
from usae.files import atomic_save_safetensors, load_safetensors


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
