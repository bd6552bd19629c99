"""usae: Universal Sparse Autoencoders for vision models.

Heavy modules are imported lazily, so ``import usae`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "UniversalSAE": "usae.sae.model",
    "SAEConfig": "usae.config",
    "TrainConfig": "usae.config",
    "Trainer": "usae.sae.trainer",
    "ArraySource": "usae.data.sources",
    "UsaeError": "usae.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'usae' has no attribute {name!r}")


__all__ = sorted(_LAZY)
