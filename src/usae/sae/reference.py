"""Import the paper's released checkpoints (``usae import-reference CONFIG.yaml --out RUN``).

The reference writes one ``uni_<Model>_checkpoint_<epoch>.pth`` per model, a dict with
``model_state_dict`` holding ``encoder.final_block.0.{weight,bias}`` (the Linear),
``encoder.final_block.1.*`` (BatchNorm1d, eps 1e-5) and ``dictionary._weights`` (n, d),
plus a YAML config whose ``model_zoo`` gives each model's ``checkpoint_path``,
``input_shape``, ``model_mean`` and ``model_std``. Files are read with
``torch.load(weights_only=True)``: nothing is unpickled beyond plain tensors and containers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from usae.config import RunConfig, SAEConfig, TrainConfig
from usae.errors import UsaeError
from usae.files import atomic_write_json
from usae.sae.model import UniversalSAE

LINEAR = "encoder.final_block.0."
NORM = "encoder.final_block.1."
DICT = "dictionary._weights"


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsaeError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsaeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_zoo"), dict) \
            or not cfg["model_zoo"]:
        raise UsaeError(f"{path}: expected a mapping with a non-empty 'model_zoo' section")
    return cfg


def _find_checkpoint(raw: str, yaml_path: Path) -> Path:
    """Relative paths: the current folder, then the YAML's folder, then its parent."""
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, yaml_path.parent / p,
                                               yaml_path.parent.parent / p]
    for c in candidates:
        if c.is_file():
            return c
    raise UsaeError(f"checkpoint {raw!r} not found (looked in: "
                    + ", ".join(str(c) for c in candidates) + ")")


def _load_state(path: Path, model: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt zip, unsafe pickle, truncated file...
        raise UsaeError(f"model {model!r}: cannot read checkpoint {path}: "
                        f"{str(err).splitlines()[0]}") from None
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UsaeError(f"model {model!r}: {path} holds no model_state_dict")
    need = [LINEAR + "weight", LINEAR + "bias", DICT]
    missing = [k for k in need if k not in state]
    if missing:
        raise UsaeError(f"model {model!r}: {path} lacks {missing}; is it a USAE checkpoint?")
    return state


def _scalar(value: Any, model: str, key: str) -> float:
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise UsaeError(f"model {model!r}: {key} must be a number, got {value!r}") from None
    if t.numel() != 1:
        raise UsaeError(f"model {model!r}: {key} must be a scalar (the paper's standardization)")
    return float(t)


def import_reference(yaml_path: str | Path, out_dir: str | Path) -> UniversalSAE:
    """Convert a reference YAML + per-model ``.pth`` set into a usae run folder."""
    yaml_path = Path(yaml_path)
    cfg = _read_yaml(yaml_path)
    zoo: dict[str, dict[str, Any]] = cfg["model_zoo"]
    sae_params = cfg.get("sae_params", {}) or {}
    encoder = sae_params.get("encoder_module", "mlp_bn_1")
    if encoder not in ("mlp_bn_1",):
        raise UsaeError(f"encoder_module {encoder!r} is not supported (only mlp_bn_1)")
    norm = sae_params.get("dictionary_normalization", "l2")
    if norm != "l2":
        raise UsaeError(f"dictionary_normalization {norm!r} is not supported (only l2)")

    states, dims = {}, []
    for name, entry in zoo.items():
        if not isinstance(entry, dict) or "checkpoint_path" not in entry:
            raise UsaeError(f"model_zoo entry {name!r} has no checkpoint_path")
        states[name] = _load_state(_find_checkpoint(str(entry["checkpoint_path"]), yaml_path),
                                   name)
        w = states[name][LINEAR + "weight"]
        dims.append(int(w.shape[1]))
        declared = entry.get("input_shape")
        if declared is not None and int(declared) != w.shape[1]:
            raise UsaeError(f"model {name!r}: input_shape {declared} but the checkpoint's "
                            f"encoder takes d={w.shape[1]}")
    n_set = {int(s[LINEAR + "weight"].shape[0]) for s in states.values()}
    if len(n_set) != 1:
        raise UsaeError(f"checkpoints disagree on the number of concepts: {sorted(n_set)}")
    n = n_set.pop()
    glob = cfg.get("global", {}) or {}
    if "exp_factor" in glob and "input_shape" in glob:
        expected = int(glob["exp_factor"]) * int(glob["input_shape"])
        if expected != n:
            raise UsaeError(f"global exp_factor x input_shape = {expected} but the checkpoints "
                            f"have n={n}")
    k = int(sae_params.get("top_k", 32))
    sae_cfg = SAEConfig(models=tuple(zoo), dims=tuple(dims), n_concepts=n, k=k,
                        encoder="mlp_bn_1", standardize="scalar")
    sae = UniversalSAE(sae_cfg)
    with torch.no_grad():
        for name, state in states.items():
            _copy_model(sae, name, state)
            mean = _scalar(zoo[name].get("model_mean", 0.0), name, "model_mean")
            std = _scalar(zoo[name].get("model_std", 1.0), name, "model_std")
            sae.set_standardization(name, torch.tensor(mean), torch.tensor(std))
    run_cfg = RunConfig(sae=sae_cfg, train=TrainConfig(), preset="paper")
    sae.save(out_dir, run_cfg)
    atomic_write_json(Path(out_dir) / "reference.json", {
        "source": str(yaml_path.resolve()),
        "models": {m: {"og_model": zoo[m].get("og_model"), "num_tokens": zoo[m].get("num_tokens"),
                       "checkpoint_path": str(zoo[m]["checkpoint_path"])} for m in zoo}})
    return sae.eval()


def _copy_model(sae: UniversalSAE, name: str, state: dict[str, torch.Tensor]) -> None:
    enc = sae.encoders[name]
    targets = {LINEAR + "weight": enc.linear.weight, LINEAR + "bias": enc.linear.bias,
               DICT: sae.dictionaries[name]}
    for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        targets[NORM + field] = getattr(enc.norm, field)
    for key, target in targets.items():
        if key not in state:
            raise UsaeError(f"model {name!r}: checkpoint lacks {key}")
        src = state[key]
        if tuple(src.shape) != tuple(target.shape):
            raise UsaeError(f"model {name!r}: {key} has shape {tuple(src.shape)}, "
                            f"expected {tuple(target.shape)}")
        if src.is_floating_point() and not torch.isfinite(src).all():
            raise UsaeError(f"model {name!r}: {key} contains NaN or Inf")
        target.copy_(src.to(target.dtype))
