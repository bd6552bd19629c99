"""``usae synth``: a store of synthetic "models" whose features are known.

Each model m has unit atoms ``A_m: (F, d_m)``; a token's activation is
``x_m = c @ A_m + mean_m + noise``, with one non-negative sparse code ``c: (F,)`` per token,
shared by every model. A feature lives in some models (zero atom elsewhere), of three kinds:

- ``shared``: in every model (the same code at the same token, through each model's atom);
- ``partial``: in a seeded subset of at least two models (with three models or more);
- ``specific``: in one model only.

Options shape the codes the way real activations look: the expected number of active features
per token, the magnitude distribution, correlated features (groups that fire together),
parent/child features (a child fires only with its parent, as the Matryoshka papers use), a
nonzero mean per model (real activations are not centered) and noise.

``DIR/store/`` is a real store (every command works on it); ``DIR/truth.safetensors`` holds the
atoms, the codes of every store row, each feature's kind and models; ``DIR/truth.json`` the
options. ``usae eval RUN --store DIR/store --truth DIR`` scores a run against it
(``usae.analysis.truth``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from usae.errors import UsaeError
from usae.files import atomic_save_safetensors, atomic_write_json, replace_folder
from usae.options import opt, validate

log = logging.getLogger(__name__)
KINDS = ("shared", "partial", "specific")
TRUTH_FILE = "truth.safetensors"
TRUTH_JSON = "truth.json"
STORE_DIR = "store"


@dataclass(frozen=True)
class SynthOptions:
    """``usae synth``."""

    dims: str = opt("Comma-separated width of each synthetic model (their count is M).",
                    "64,48,56")
    shared: int = opt("Features in every model.", 24, minimum=0)
    partial: int = opt("Features in a seeded subset of at least two models (M >= 3).", 12,
                       minimum=0)
    specific: int = opt("Features of each model alone.", 12, minimum=0)
    children: int = opt("Children of each of the first shared features (parent/child "
                        "structure): a child fires only when its parent does, and is itself "
                        "a shared feature. 0: none.", 0, minimum=0, maximum=8)
    parents: int = opt("Shared features that have children (with --children).", 4, minimum=0)
    images: int = opt("Synthetic images.", 4000, minimum=10)
    tokens: int = opt("Tokens per image.", 16, minimum=1)
    active: float = opt("Expected active features per token (over all features).", 4.0,
                        minimum=0.1)
    magnitude: str = opt("Distribution of an active feature's magnitude: exponential (mean "
                         "1), lognormal (median 1, sigma 0.5) or uniform (0.5 to 1.5).",
                         "exponential", choices=("exponential", "lognormal", "uniform"))
    correlation: float = opt("Share of each feature's firing that comes from its group of 4 "
                             "(correlated features); 0: independent.", 0.0, minimum=0.0,
                             maximum=1.0)
    mean_shift: float = opt("Norm of each model's mean, relative to the typical norm of its "
                            "centred activation (real activations are not centred).", 2.0,
                            minimum=0.0)
    noise: float = opt("Std of Gaussian noise per dimension, relative to the signal's RMS per "
                       "dimension.", 0.02, minimum=0.0)
    val_fraction: float = opt("Held-out fraction of the images.", 0.1, minimum=0.0, below=1.0)
    seed: int = opt("Seed of everything.", 0, minimum=0, maximum=2**63 - 1)

    def __post_init__(self) -> None:
        validate(self)
        d = self.model_dims()
        if len(d) < 2:
            raise UsaeError("--dims needs at least two models, e.g. 64,48,56")
        if self.n_features() == 0:
            raise UsaeError("no features: give --shared, --partial or --specific")
        if self.children and self.parents > self.shared:
            raise UsaeError(f"--parents {self.parents} is more than --shared {self.shared}")

    def model_dims(self) -> tuple[int, ...]:
        try:
            dims = tuple(int(x) for x in self.dims.split(",") if x.strip())
        except ValueError:
            raise UsaeError(f"--dims takes integers D[,D...], got {self.dims!r}") from None
        if any(x < 2 for x in dims):
            raise UsaeError(f"--dims must be at least 2 each, got {self.dims!r}")
        return dims

    def n_children(self) -> int:
        return self.children * self.parents if self.children else 0

    def n_features(self) -> int:
        m = len(self.model_dims())
        partial = self.partial if m >= 3 else 0
        return self.shared + self.n_children() + partial + m * self.specific

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def model_names(count: int) -> list[str]:
    return [f"synth{i}" for i in range(count)]


def feature_layout(o: SynthOptions, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kind (F,) index into KINDS, membership (F, M) bool, parent (F,) (-1: none)."""
    m = len(o.model_dims())
    rows: list[tuple[int, list[bool], int]] = [(0, [True] * m, -1)] * o.shared
    for p in range(o.parents if o.children else 0):
        rows += [(0, [True] * m, p)] * o.children
    for _ in range(o.partial if m >= 3 else 0):
        size = int(rng.integers(2, m))  # at least two models, not all of them
        chosen = set(rng.choice(m, size=size, replace=False).tolist())
        rows.append((1, [j in chosen for j in range(m)], -1))
    for j in range(m):
        rows += [(2, [i == j for i in range(m)], -1)] * o.specific
    kinds, member, parent = zip(*rows)
    return np.array(kinds, np.int8), np.array(member, bool), np.array(parent, np.int64)


def _magnitudes(o: SynthOptions, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if o.magnitude == "exponential":
        return rng.exponential(1.0, shape)
    if o.magnitude == "lognormal":
        return rng.lognormal(0.0, 0.5, shape)
    return rng.uniform(0.5, 1.5, shape)


def sample_codes(o: SynthOptions, parent: np.ndarray, n_tokens: int,
                 rng: np.random.Generator) -> np.ndarray:
    """(n_tokens, F) non-negative sparse codes with the options' structure."""
    f = len(parent)
    roots = parent < 0
    p = min(1.0, o.active / max(int(roots.sum()), 1))
    own = rng.random((n_tokens, f)) < p * (1.0 - o.correlation)
    if o.correlation > 0:  # groups of 4 consecutive features fire together
        groups = rng.random((n_tokens, (f + 3) // 4)) < p
        joined = np.repeat(groups, 4, axis=1)[:, :f] & (rng.random((n_tokens, f)) <
                                                          o.correlation)
        own |= joined
    fires = own & roots[None, :]
    for child in np.flatnonzero(~roots):  # a child fires only with its parent (half the time)
        fires[:, child] = fires[:, parent[child]] & (rng.random(n_tokens) < 0.5)
    return (fires * _magnitudes(o, rng, (n_tokens, f))).astype(np.float32)


def unit_atoms(d: int, member: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(F, d): a random unit atom for each feature that lives in the model, zeros elsewhere."""
    atoms = rng.normal(size=(len(member), d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    return (atoms * member[:, None]).astype(np.float32)


def generate(o: SynthOptions) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The activations ``{model: (images, tokens, d)}`` and the truth tensors."""
    rng = np.random.default_rng(o.seed)
    dims = o.model_dims()
    names = model_names(len(dims))
    kind, member, parent = feature_layout(o, rng)
    n_tok = o.images * o.tokens
    codes = sample_codes(o, parent, n_tok, rng)
    arrays, truth = {}, {"kind": kind, "membership": member.astype(np.uint8), "parent": parent,
                         "codes": codes}
    for j, (m, d) in enumerate(zip(names, dims)):
        atoms = unit_atoms(d, member[:, j], rng)
        signal = codes @ atoms  # (n_tok, d)
        rms = float(np.sqrt((signal ** 2).mean())) or 1.0
        direction = rng.normal(size=d)
        mean = direction / np.linalg.norm(direction) * o.mean_shift * rms * np.sqrt(d)
        x = signal + mean + rng.normal(scale=o.noise * rms, size=signal.shape)
        arrays[m] = x.reshape(o.images, o.tokens, d).astype(np.float32)
        truth[f"atoms.{m}"], truth[f"mean.{m}"] = atoms, mean.astype(np.float32)
    return arrays, truth


def synth(out: str | Path, options: SynthOptions | None = None, force: bool = False
          ) -> dict[str, Any]:
    """Write ``out/store/``, ``out/truth.safetensors`` and ``out/truth.json``; returns the
    summary (models, dims, feature counts)."""
    import torch

    from usae.store.writer import store_from_arrays

    o = options or SynthOptions()
    if (Path(out) / TRUTH_JSON).exists() and not force:
        raise UsaeError(f"{out} already holds a synthetic store — pass --force to replace it, "
                        "or choose another --out")
    arrays, truth = generate(o)
    names = list(arrays)
    kinds = truth["kind"]
    summary = {"models": names, "dims": list(o.model_dims()), "options": o.to_json(),
               "features": {k: int((kinds == i).sum()) for i, k in enumerate(KINDS)},
               "n_features": int(len(kinds)), "images": o.images, "tokens": o.tokens}
    with replace_folder(out, TRUTH_JSON, force=force, what="synth") as tmp:
        n_val = int(round(o.images * o.val_fraction))
        held_out = set(np.random.default_rng([o.seed, 7]).permutation(o.images)[:n_val].tolist())
        splits = ["val" if i in held_out else "train" for i in range(o.images)]
        store_from_arrays(tmp / STORE_DIR, arrays, dtype="float32", splits=splits,
                          paths=[f"synth/{i}" for i in range(o.images)])
        atomic_save_safetensors(tmp / TRUTH_FILE, {k: torch.from_numpy(np.ascontiguousarray(v))
                                                   for k, v in truth.items()})
        atomic_write_json(tmp / TRUTH_JSON, summary)
    log.info("synthetic store: %d models, %d features (%s)", len(names), len(kinds),
             ", ".join(f"{k} {v}" for k, v in summary["features"].items()))
    return summary
