"""Scoring a run against the known features of a ``usae synth`` store (``eval --truth DIR``).

Everything is measured in each model's raw activation space: concept k's direction in model
m is its unit dictionary row mapped back through the run's standardization
(``unstandardize(D_k) - unstandardize(0)``, normalized), compared by cosine with the true
unit atoms.

- ``recovery[m]``: the mean over the features living in m of the best cosine to any concept.
- ``shared_as_one``: the fraction of features living in every model for which *one* concept
  reaches ``match_cosine`` in every model at once (``partial_as_one``: the same for features
  of a subset of models).
- ``specific_detected``: the fraction of model-specific features whose best concept in their
  model reaches ``match_cosine`` and is classed model-specific, owned by that model, by the
  eval's firing entropy.
- ``mcc[m]``: the mean correlation of matched pairs (Hungarian on |Pearson|) between the true
  codes of m's features and m's learned codes, on the evaluated tokens.
- ``spurious``: concepts that fire on the evaluated tokens but reach ``match_cosine`` with no
  true feature in any model (their fraction of the firing concepts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from usae.errors import UsaeError
from usae.files import load_safetensors, read_json
from usae.sae.model import UniversalSAE
from usae.store.store import Store

MATCH_COSINE = 0.9  # a concept "is" a feature from this cosine on


def load_truth(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The summary and tensors of ``usae synth``'s folder (or its truth.safetensors)."""
    from usae.analysis.synth import TRUTH_FILE, TRUTH_JSON

    path = Path(path)
    folder = path.parent if path.name == TRUTH_FILE else path
    if not (folder / TRUTH_FILE).exists():
        raise UsaeError(f"{path} holds no {TRUTH_FILE} — pass the folder `usae synth --out` "
                        "wrote")
    return read_json(folder / TRUTH_JSON, "synth summary"), load_safetensors(folder / TRUTH_FILE)


def raw_directions(sae: UniversalSAE, model: str) -> np.ndarray:
    """(n, d) unit directions of the concepts in ``model``'s raw activation space."""
    with torch.no_grad():
        d_nd = sae.normalized_dict(model).float()
        zero = sae.unstandardize(model, torch.zeros_like(d_nd[:1]))
        raw = (sae.unstandardize(model, d_nd) - zero).double().cpu().numpy()
    return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)


def cosines(atoms_fd: np.ndarray, dirs_nd: np.ndarray) -> np.ndarray:
    """(F, n) cosine of each true unit atom with each concept direction."""
    return atoms_fd.astype(np.float64) @ dirs_nd.T


def matched_correlation(true_tf: np.ndarray, learned_tn: np.ndarray) -> float:
    """Mean |Pearson| of a one-to-one matching (Hungarian) of true features to concepts."""
    from scipy.optimize import linear_sum_assignment

    def zscore(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64) - a.mean(0)
        sd = a.std(0)
        return a / np.where(sd > 0, sd, np.inf)  # a constant code: z-scores of exactly 0

    corr = np.abs(zscore(true_tf).T @ zscore(learned_tn)) / max(len(true_tf), 1)  # (F, n)
    rows, cols = linear_sum_assignment(-corr)
    return float(corr[rows, cols].sum() / max(true_tf.shape[1], 1))


def score_truth(sae: UniversalSAE, store: Store, rows: np.ndarray,
                truth: tuple[dict[str, Any], dict[str, torch.Tensor]],
                classes: dict[str, np.ndarray], match: float = MATCH_COSINE) -> dict[str, Any]:
    """The ``truth`` section of ``report.json``. ``truth``: what ``load_truth`` read;
    ``rows``: the evaluated store rows; ``classes``: the eval's per-concept ``specific`` mask
    and ``owner`` model index, and ``fires`` (M, n)."""
    summary, t = truth
    models = list(sae.models)
    if summary["models"] != models:
        raise UsaeError(f"the truth is for models {summary['models']}, not the run's {models}")
    member = t["membership"].numpy().astype(bool)  # (F, M)
    kind = t["kind"].numpy()
    cos = {m: cosines(t[f"atoms.{m}"].numpy(), raw_directions(sae, m)) for m in models}
    out: dict[str, Any] = {"match_cosine": match, "features": summary["features"],
                           "recovery": {}, "mcc": {}}
    for j, m in enumerate(models):
        out["recovery"][m] = round(float(cos[m][member[:, j]].max(1).mean()), 4)
    out.update(_as_one(cos, member, kind, models, match))
    out["specific_detected"] = _specific_detected(cos, member, kind, models, classes, match)
    out["mcc"] = _mcc(sae, store, rows, t["codes"].numpy(), member, models,
                      int(summary["tokens"]))
    out["mcc_mean"] = round(float(np.mean(list(out["mcc"].values()))), 4)
    best_any = np.max(np.stack([cos[m].max(0) for m in models]), axis=0)  # (n,)
    firing = classes["fires"].sum(0) > 0
    spurious = firing & (best_any < match)
    out["spurious"] = {"count": int(spurious.sum()), "firing": int(firing.sum()),
                       "fraction": round(float(spurious.sum() / max(firing.sum(), 1)), 4)}
    return out


def _as_one(cos: dict[str, np.ndarray], member: np.ndarray, kind: np.ndarray,
            models: list[str], match: float) -> dict[str, Any]:
    """Per multi-model feature: is there one concept that matches it in all its models?"""
    out = {}
    for name, k in (("shared_as_one", 0), ("partial_as_one", 1)):
        feats = np.flatnonzero(kind == k)
        if len(feats) == 0:
            out[name] = None
            continue
        hits = []
        for f in feats:
            inside = [cos[m][f] for j, m in enumerate(models) if member[f, j]]
            hits.append(float(np.min(np.stack(inside), axis=0).max()) >= match)
        out[name] = round(float(np.mean(hits)), 4)
    return out


def _specific_detected(cos: dict[str, np.ndarray], member: np.ndarray, kind: np.ndarray,
                       models: list[str], classes: dict[str, np.ndarray],
                       match: float) -> float | None:
    hits = []
    for f in np.flatnonzero(kind == 2):
        j = int(np.flatnonzero(member[f])[0])
        k = int(np.argmax(cos[models[j]][f]))
        hits.append(cos[models[j]][f, k] >= match and bool(classes["specific"][k])
                    and int(classes["owner"][k]) == j)
    return round(float(np.mean(hits)), 4) if hits else None


def _mcc(sae: UniversalSAE, store: Store, rows: np.ndarray, codes_tf: np.ndarray,
         member: np.ndarray, models: list[str], tokens: int) -> dict[str, float]:
    """Per model: matched correlation of true and learned codes on the evaluated tokens
    (store row r holds synthetic image r, whose codes are rows r*tokens ... of ``codes``)."""
    rows = np.sort(np.asarray(rows))
    token_index = (rows[:, None] * tokens + np.arange(tokens)[None, :]).reshape(-1)
    true = codes_tf[token_index]
    out = {}
    for j, m in enumerate(models):
        x = store.read(m, rows)
        learned = sae.encode(m, x.reshape(-1, x.shape[-1]).float()).numpy()
        out[m] = round(matched_correlation(true[:, member[:, j]], learned), 4)
    return out
