"""The objective seam: the sparsity rule and the reconstruction criterion, each a named
strategy chosen by config (``SAEConfig.sparsity``, ``TrainConfig.criterion``).

Adding an objective is one new module plus one line in a registry below. Entries are
``"module:attribute"`` paths, imported on first use, so reading the names (config checks,
``--help``) does not import torch. ``register_sparsity``/``register_criterion`` add one at
run time (tests do, for an objective that exists only there).

- A sparsity rule (``usae.sae.objectives.base.SparsityRule``) turns the ReLU'd pre-activations
  ``post_nc`` (n_tokens, n_concepts) into sparse codes ``(values_nk, indices_nk)``; it is what
  the encoder, every training kernel and inference call.
- A criterion (``usae.sae.objectives.base.Criterion``) turns the concatenated targets and
  reconstructions of every model into the loss and its per-model terms.
"""

from __future__ import annotations

import importlib
from typing import Any

SPARSITY: dict[str, Any] = {
    "topk": "usae.sae.objectives.topk:TopK",
    "batchtopk": "usae.sae.objectives.batch_topk:BatchTopK",
    "energy": "usae.sae.objectives.energy:Energy",
}

# rules that keep state every model shares (their buffers): a frozen model cannot keep its
# codes under one (usae train --extend refuses them)
STATEFUL = {"batchtopk"}

CRITERIA: dict[str, Any] = {
    "l1": "usae.sae.objectives.criteria:L1",
    "l2": "usae.sae.objectives.criteria:L2",
}


def _resolve(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    entry = table[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = table[name] = getattr(importlib.import_module(module), attr)
    return entry()


def sparsity_rule(name: str) -> Any:
    """A fresh instance of the sparsity rule ``name`` (``SparsityRule``)."""
    return _resolve(SPARSITY, "sparsity rule", name)


def criterion(name: str) -> Any:
    """A fresh instance of the reconstruction criterion ``name`` (``Criterion``)."""
    return _resolve(CRITERIA, "criterion", name)


def register_sparsity(name: str, factory: Any) -> None:
    """Make ``SAEConfig(sparsity=name)`` build ``factory()``."""
    SPARSITY[name] = factory


def register_criterion(name: str, factory: Any) -> None:
    """Make ``TrainConfig(criterion=name)`` use ``factory()``."""
    CRITERIA[name] = factory
