"""Controls that give the universality metrics meaning.

- Independent SAEs (the paper's Fig. 7): match each model's USAE dictionary to an ordinary
  TopK SAE trained on the same model alone, by Hungarian assignment on cosine similarity,
  against a random-Gaussian dictionary matched the same way.

Pure functions of dictionaries: run comparisons live in ``usae.analysis.evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from usae.errors import UsaeError
from usae.sae import run as run_folder
from usae.sae.model import UniversalSAE


def match_dictionaries(a_nd: torch.Tensor, b_nd: torch.Tensor) -> np.ndarray:
    """Cosine of each matched pair under the one-to-one assignment maximizing total cosine."""
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(a_nd.double(), dim=1)
    b = torch.nn.functional.normalize(b_nd.double(), dim=1)
    sim = (a @ b.T).numpy()
    r, c = linear_sum_assignment(sim, maximize=True)
    return sim[r, c]


def independent_consistency(sae: UniversalSAE, independent_run: str | Path,
                            threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Per model: fraction of USAE concepts matched with cosine > ``threshold``, mean cosine,
    and the same for a random Gaussian dictionary (the chance level)."""
    root = Path(independent_run)
    if not (root / run_folder.INDEPENDENT_FILE).exists():
        raise UsaeError(f"{root} is not an independent run (train it with --independent)")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"cosine_threshold": threshold, "models": {}}
    for m in sae.models:
        ind = UniversalSAE.load(root / m)
        if ind.cfg.dims != (sae.dim(m),):
            raise UsaeError(f"model {m!r}: the independent SAE has d={ind.cfg.dims[0]}, the "
                            f"universal SAE d={sae.dim(m)}")
        u = sae.normalized_dict(m).detach().cpu()
        cos = match_dictionaries(u, ind.normalized_dict(m).detach().cpu())
        rand = match_dictionaries(u, torch.randn(ind.cfg.n, sae.dim(m), generator=g))
        out["models"][m] = {"matched_fraction": float((cos > threshold).mean()),
                            "mean_cosine": float(cos.mean()),
                            "random_matched_fraction": float((rand > threshold).mean()),
                            "random_mean_cosine": float(rand.mean())}
    return out
