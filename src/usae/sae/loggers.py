"""Optional metric sinks beside ``metrics.jsonl``: TensorBoard and Weights & Biases.

Both are imported lazily and only when asked for; W&B runs offline unless ``WANDB_MODE``
says otherwise, so no account is ever required.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from usae.errors import UsaeError


class MetricSinks:
    """Fans each logged row out to the sinks the config enables."""

    def __init__(self, out: Path, tensorboard: bool, wandb: bool,
                 config: dict[str, Any]) -> None:
        self._writers: list[tuple[str, Any]] = []
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsaeError("tensorboard=true needs `pip install tensorboard`") from None
            self._writers.append(("tb", SummaryWriter(str(out / "tb"))))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise UsaeError("wandb=true needs `pip install wandb`") from None
            run = wandb_lib.init(project="usae", dir=str(out), config=config,
                                 mode=os.environ.get("WANDB_MODE", "offline"))
            self._writers.append(("wandb", run))

    def log(self, row: dict[str, Any]) -> None:
        """Every numeric scalar of ``row`` at step ``row["step"]``."""
        scalars = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for kind, writer in self._writers:
            if kind == "tb":
                for k, v in scalars.items():
                    writer.add_scalar(k, v, row["step"])
            else:
                writer.log(scalars, step=row["step"])

    def close(self) -> None:
        for kind, writer in self._writers:
            writer.close() if kind == "tb" else writer.finish()
        self._writers = []
