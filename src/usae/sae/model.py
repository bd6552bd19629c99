"""The universal SAE: one encoder and one dictionary per model, a shared concept space.

Shapes: ``x_nd`` raw activations (n_tokens, d_m); ``pre_nc`` encoder output before ReLU
(n_tokens, n_concepts); codes are kept sparse as ``(values_nk, indices_nk)`` and made dense
only on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usae.config import RunConfig, SAEConfig
from usae.errors import UsaeError
from usae.hub import local_run
from usae.sae import run as run_folder
from usae.sae.objectives import sparsity_rule

STD_EPS = 1e-5  # the reference's (x - mean) / (std + 1e-5)
DICT_EPS = 1e-8  # the reference's W / (||W_row|| + 1e-8)


class EncodeOut(NamedTuple):
    """Encoder outputs. ``pre_nc``: before ReLU; ``values_nk``/``indices_nk``: the sparse
    codes the sparsity rule selected (zero values are inactive padding)."""

    pre_nc: Tensor
    values_nk: Tensor
    indices_nk: Tensor


class Encoder(nn.Module):
    """``Linear(d -> n, bias)`` then an optional norm; ReLU and TopK are applied by the SAE."""

    def __init__(self, d: int, n: int, kind: str) -> None:
        super().__init__()
        self.linear = nn.Linear(d, n)
        if kind == "mlp_bn_1":
            self.norm: nn.Module = nn.BatchNorm1d(n, eps=1e-5)
        elif kind == "mlp_ln_1":
            self.norm = nn.LayerNorm(n)
        else:
            self.norm = nn.Identity()

    def forward(self, x_nd: Tensor) -> Tensor:
        return self.norm(self.linear(x_nd))


def normalize_rows(w_nd: Tensor) -> Tensor:
    """The reference's dictionary normalization, applied at every use."""
    return w_nd / (w_nd.norm(dim=1, keepdim=True) + DICT_EPS)


def ball_rows(w_nd: Tensor) -> Tensor:
    """``dictionary_norm=ball``: rows longer than 1 scaled to norm 1, shorter ones kept."""
    return w_nd / w_nd.norm(dim=1, keepdim=True).clamp_min(1.0)


def sparse_decode(values_nk: Tensor, indices_nk: Tensor, dict_nd: Tensor) -> Tensor:
    """``codes @ dict`` without building the dense code matrix: gathers the k rows per token."""
    return F.embedding_bag(indices_nk, dict_nd, per_sample_weights=values_nk, mode="sum")


def densify(values_nk: Tensor, indices_nk: Tensor, n: int) -> Tensor:
    """Sparse TopK codes to a dense (n_tokens, n) matrix."""
    out = values_nk.new_zeros(values_nk.shape[0], n)
    return out.scatter_(1, indices_nk, values_nk)


class UniversalSAE(nn.Module):
    """Per-model encoders and dictionaries over a shared concept space of size ``cfg.n``."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if not cfg.models:
            raise UsaeError("a universal SAE needs at least one model")
        self.cfg = cfg
        n = cfg.n
        self.encoders = nn.ModuleDict({m: Encoder(d, n, cfg.encoder)
                                       for m, d in zip(cfg.models, cfg.dims)})
        self.dictionaries = nn.ParameterDict({
            m: nn.Parameter(torch.randn(n, d) / d ** 0.5) for m, d in zip(cfg.models, cfg.dims)})
        for m, d in zip(cfg.models, cfg.dims):
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"scale_{m}", torch.ones(d))
        self.rule = sparsity_rule(cfg.sparsity)  # (the config checked the name)
        for name, value in self.rule.buffers(n).items():
            self.register_buffer(name, value)

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def models(self) -> tuple[str, ...]:
        return self.cfg.models

    def dim(self, model: str) -> int:
        return self.cfg.dims[self.index(model)]

    def index(self, model: str) -> int:
        try:
            return self.cfg.models.index(model)
        except ValueError:
            raise UsaeError(f"unknown model {model!r}; this SAE has {list(self.cfg.models)}"
                            ) from None

    def model_parameters(self, model: str) -> list[nn.Parameter]:
        """Encoder and dictionary parameters of one model (one optimizer each)."""
        return [*self.encoders[model].parameters(), self.dictionaries[model]]

    @torch.no_grad()
    def init_encoders_from_dictionaries(self) -> None:
        """Every encoder's weight := its model's unit-row dictionary (the decoder transposed,
        as ``x @ W^T`` reads it), bias := 0 (Gao et al. 2024's initialization)."""
        for m in self.models:
            linear = self.encoders[m].linear
            linear.weight.copy_(self.normalized_dict(m))
            linear.bias.zero_()

    def set_standardization(self, model: str, mean_d: Tensor, std_d: Tensor) -> None:
        """Set the input statistics: standardized = (x - mean) / (std + 1e-5)."""
        d = self.dim(model)
        mean_d = torch.as_tensor(mean_d, dtype=torch.float32).expand(d).clone()
        std_d = torch.as_tensor(std_d, dtype=torch.float32).expand(d).clone()
        getattr(self, f"mean_{model}").copy_(mean_d)
        getattr(self, f"scale_{model}").copy_(std_d + STD_EPS)

    def standardize(self, model: str, x_nd: Tensor) -> Tensor:
        return (x_nd - getattr(self, f"mean_{model}")) / getattr(self, f"scale_{model}")

    def unstandardize(self, model: str, x_nd: Tensor) -> Tensor:
        return x_nd * getattr(self, f"scale_{model}") + getattr(self, f"mean_{model}")

    def check_input(self, model: str, x_nd: Tensor) -> None:
        """Clear errors for wrong shapes and non-finite values, before they reach the weights."""
        d = self.dim(model)
        if x_nd.ndim != 2 or x_nd.shape[1] != d:
            raise UsaeError(f"model {model!r}: expected activations of shape (N, {d}), "
                            f"got {tuple(x_nd.shape)}")
        if not torch.isfinite(x_nd).all():
            bad = int((~torch.isfinite(x_nd)).any(dim=1).sum())
            raise UsaeError(f"model {model!r}: activations contain NaN or Inf in {bad} row(s)")

    # ---- the maths ---------------------------------------------------------------------
    def normalized_dict(self, model: str) -> Tensor:
        """(n, d_m) dictionary with unit rows (``dictionary_norm=ball``: rows of norm <= 1)."""
        if self.cfg.dictionary_norm == "ball":
            return ball_rows(self.dictionaries[model])
        return normalize_rows(self.dictionaries[model])

    def pre_activations(self, model: str, xs_nd: Tensor) -> Tensor:
        """Standardized activations (N, d) -> the encoder's pre-activations (N, n), before
        ReLU and TopK (what TopK ranks; smooth where TopK is not)."""
        return self.encoders[model](xs_nd)

    def linear(self, model: str) -> nn.Linear:
        """The linear map of ``model``'s encoder (for ``encoder=linear``, the whole encoder:
        the sparse step's kernel fuses it with the selection)."""
        return self.encoders[model].linear

    def select(self, post_nc: Tensor) -> tuple[Tensor, Tensor]:
        """The sparsity rule (``cfg.sparsity``) on ReLU'd pre-activations (N, n): sparse
        codes ``(values_nk, indices_nk)``. Rules with state (BatchTopK's threshold) read
        ``self.training``: a batch selection in training, a fixed one in eval mode."""
        return self.rule.select(post_nc, self.cfg.k, self)

    def encode_standardized(self, model: str, xs_nd: Tensor) -> EncodeOut:
        """The sparsity rule on ReLU(encoder(x)), for already standardized activations."""
        pre_nc = self.encoders[model](xs_nd)
        values_nk, indices_nk = self.select(F.relu(pre_nc))
        return EncodeOut(pre_nc, values_nk, indices_nk)

    @torch.no_grad()
    def encode(self, model: str, x_nd: Tensor, batch_size: int = 8192) -> Tensor:
        """Raw activations (N, d_m) -> dense codes (N, n) float32, in eval mode."""
        x_nd = torch.as_tensor(x_nd)
        self.check_input(model, x_nd)
        was_training = self.training
        self.eval()
        try:
            outs = []
            for chunk in x_nd.split(batch_size):
                chunk = chunk.to(self.device_of(), torch.float32)
                enc = self.encode_standardized(model, self.standardize(model, chunk))
                outs.append(densify(enc.values_nk, enc.indices_nk, self.cfg.n).cpu())
            return torch.cat(outs) if outs else torch.zeros(0, self.cfg.n)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode(self, model: str, codes_nc: Tensor, batch_size: int = 8192) -> Tensor:
        """Dense codes (N, n) -> activations (N, d_m) in the model's raw space."""
        codes_nc = torch.as_tensor(codes_nc, dtype=torch.float32)
        if codes_nc.ndim != 2 or codes_nc.shape[1] != self.cfg.n:
            raise UsaeError(f"codes must have shape (N, {self.cfg.n}), got {tuple(codes_nc.shape)}")
        if not torch.isfinite(codes_nc).all():
            raise UsaeError("codes contain NaN or Inf")
        dict_nd = self.normalized_dict(model)
        outs = [self.unstandardize(model, c.to(dict_nd.device) @ dict_nd).cpu()
                for c in codes_nc.split(batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.dim(model))

    def device_of(self) -> torch.device:
        return self.dictionaries[self.cfg.models[0]].device

    # ---- persistence -------------------------------------------------------------------
    def save(self, run_dir: str | Path, run_cfg: RunConfig | None = None) -> None:
        """Write ``model.safetensors`` and, when given, ``config.json`` marked final."""
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        run_folder.save_weights(run_dir, self.state_dict())
        if run_cfg is not None:
            run_folder.write_config(run_dir, run_cfg, run_folder.final_status())

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "UniversalSAE":
        """Load a run folder written by ``usae train`` or ``usae import-reference``, or a shared
        run ``hf://OWNER/NAME[@revision]``; warns when the run is partial."""
        run_dir = local_run(run_dir)
        run_cfg = run_folder.read_config(run_dir)
        run_folder.warn_if_partial(run_dir)
        sae = cls(run_cfg.sae)
        state = run_folder.load_weights(run_dir)
        try:
            sae.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
            raise UsaeError(f"{Path(run_dir) / run_folder.WEIGHTS_FILE} does not match "
                            f"config.json: {detail or err}") from None
        return sae.to(device).eval()
