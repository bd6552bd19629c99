"""Options of the commands other than ``train`` (whose options are ``config.TrainConfig``).

Each command's options are one frozen dataclass; every field carries its help text and its
limits in ``metadata``. The CLI builds its flags and ``--help`` defaults from these classes,
and the Python functions take their defaults from them, so an option is defined once.
Validation lives in ``__post_init__``: a bad value is a one-line ``UsaeError``.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, get_type_hints

from usae.errors import UsaeError

STORE_DTYPES = ("float16", "bfloat16", "float32")


def default_workers(device: str = "cpu") -> int:
    """Image-decoding threads for this machine. On a CPU run the forward passes need the
    cores (decoding is ~6 % of their work): 1 up to 4 cores, then one per 4 cores. A GPU waits
    on decoding: every core but two, up to 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    if device.startswith("cuda"):
        return max(1, min(16, cores - 2))
    return 1 if cores <= 4 else cores // 4


def opt(text: str, default: Any, *, choices: tuple | None = None, minimum: float | None = None,
        maximum: float | None = None, below: float | None = None) -> Any:
    """A field with help text and limits (``below``: strictly less than)."""
    return field(default=default, metadata={"help": text, "choices": choices, "min": minimum,
                                            "max": maximum, "below": below})


def check_device(device: str) -> None:
    """``cpu`` or an available ``cuda[:i]``."""
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UsaeError(f"--device must be cpu or cuda[:i], got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsaeError(f"--device {device} was requested but CUDA is not available — use "
                            "--device cpu")


def validate(obj: Any) -> None:
    """Apply every field's choices and limits; finite floats only. Errors name the flag
    (``--batch-size``), or the config key (``config: lr``) for classes whose
    ``OPTION_NAMES`` is ``"key"`` (the training config, set by flags, --set and files)."""
    keys = getattr(obj, "OPTION_NAMES", "flag") == "key"
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        flag = f"config: {f.name}" if keys else "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsaeError(f"{flag} must be a finite number, got {value}")
        if meta.get("choices") and value not in meta["choices"]:
            raise UsaeError(f"{flag} must be one of {list(meta['choices'])}, got {value!r}")
        if meta.get("min") is not None and value < meta["min"]:
            raise UsaeError(f"{flag} must be at least {meta['min']}, got {value}")
        if meta.get("max") is not None and value > meta["max"]:
            raise UsaeError(f"{flag} must be at most {meta['max']}, got {value}")
        if meta.get("below") is not None and value >= meta["below"]:
            raise UsaeError(f"{flag} must be less than {meta['below']}, got {value}")
    if hasattr(obj, "device") and not keys:  # (a run's config names the device it was
        check_device(obj.device)             # trained on: it must load on any machine)


AUTOMATIC_WORKERS = -1  # "from the machine and the device" (``default_workers``)


@dataclass(frozen=True)
class ImageDataOptions:
    """How images become aligned activations: shared by ``usae cache`` and
    ``usae train --images`` (which promises the same activations as a cached store)."""

    workers: int = opt("Image-decoding threads (0: decode between batches; -1: from the "
                       "machine and device: on a CPU 1 thread up to 4 cores, then cores/4; "
                       "with CUDA every core but two, up to 16).", AUTOMATIC_WORKERS,
                       minimum=AUTOMATIC_WORKERS)
    align: str = opt("resample: feature grids are resampled to the smallest (paper); "
                     "resize_input: inputs are resized so grids match.", "resample",
                     choices=("resample", "resize_input"))
    keep_cls: bool = opt("Keep the CLS token as an extra row.", False)
    val_fraction: float = opt("Held-out fraction when the images have no split folders.", 0.1,
                              minimum=0.0, below=1.0)
    split_seed: int = opt("Seed of the held-out split.", 0, minimum=0, maximum=2**63 - 1)

    def __post_init__(self) -> None:
        validate(self)

    def resolved_workers(self, device: str) -> int:
        """``workers``, with -1 resolved for ``device``."""
        return default_workers(device) if self.workers == AUTOMATIC_WORKERS else self.workers


@dataclass(frozen=True)
class CacheOptions(ImageDataOptions):
    """``usae cache``."""

    dtype: str = opt("Stored precision.", "float16", choices=STORE_DTYPES)
    batch_size: int = opt("Images per forward batch.", 32, minimum=1)
    device: str = opt("cpu or cuda[:i].", "cpu")
    shard_dir: str = opt("Under torchrun without a shared filesystem: each rank writes its part "
                         "as a store of its own in this folder (shard-R-of-N), instead of one "
                         "store at --out; join them with `usae store merge`.", "")


# the cache options `store add-model` takes from the store itself, not from flags
STORE_KEEPS = ("dtype", "align", "keep_cls", "val_fraction", "split_seed", "shard_dir")


@dataclass(frozen=True)
class StreamOptions(ImageDataOptions):
    """``usae train --images``: the image options of ``cache``, and the stream's own."""

    shuffle_buffer: int = opt("Images shuffled together (chunks of 64 consecutive images, as "
                              "a store is read).", 512, minimum=1)
    stats_images: int = opt("Images sampled for the standardization statistics.", 1024,
                            minimum=1)


@dataclass(frozen=True)
class EvalOptions:
    """``usae eval``."""

    split: str = opt("Split to evaluate, or 'all'.", "val")
    threshold: float = opt("Firing threshold tau.", 0.1, minimum=0.0)
    batch_images: int = opt("Images per evaluation batch.", 32, minimum=1)
    device: str = opt("cpu or cuda[:i].", "cpu")
    top_images: int = opt("Top images kept per concept (top_images.safetensors).", 16,
                          minimum=1)
    plots: bool = opt("Write PNG plots.", True)
    faithfulness: bool = opt("Run each model's own head on spliced reconstructions (top-1 "
                             "agreement, KL, KL recovered over the mean ablation) where the "
                             "store's models can be rebuilt and have a head.", True)
    faithfulness_images: int = opt("Images of the split used for faithfulness (0: all).", 512,
                                   minimum=0)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ExploreOptions:
    """``usae explore``."""

    top: int = opt("Top images shown per concept.", 10, minimum=1)
    split: str = opt("Split whose images are ranked for the concept pages.", "all")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class CamOptions:
    """``usae cam``. Defaults suit a GPU (as MACO); on a 2-core CPU, ``usae demo`` uses
    ``steps=64, crops=1`` (about 8 s per model and concept)."""

    steps: int = opt("Optimization steps per concept and model.", 1000, minimum=1)
    size: int = opt("Side of the optimized image in pixels.", 224, minimum=32)
    crops: int = opt("Random crops per step (25-100% of the area).", 6, minimum=1)
    lr: float = opt("NAdam learning rate on the Fourier phase.", 0.15, minimum=1e-6,
                    maximum=100.0)
    noise: float = opt("Std of the Gaussian noise added to each crop.", 0.02, minimum=0.0)
    seed: int = opt("Seed: the shared starting phase and augmentations.", 0, minimum=0,
                    maximum=2**63 - 1)
    spectrum_images: int = opt("Source images used to estimate the spectrum.", 256, minimum=1)
    device: str = opt("cpu or cuda[:i].", "cpu")

    def __post_init__(self) -> None:
        validate(self)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def merged(cls: type, base: Any | None, changes: dict[str, Any]) -> Any:
    """``base`` (or the defaults) with ``changes`` applied, validated."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {unknown}")
    return replace(base if base is not None else cls(), **changes)


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, *,
                  unset: bool = False, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (except ``skip``), help text with the default; booleans
    become switches. ``unset``: every flag defaults to None, so that only what the user gave
    is applied (over a preset or a config file); booleans then get ``--x``/``--no-x``."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, dashed = "--" + f.name.replace("_", "-"), f.name.replace("_", "-")
        text = f.metadata.get("help", "").replace("%", "%%")  # (argparse formats help with %)
        hint = hints[f.name]
        if unset:
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction if hint is bool else None,
                                type=None if hint is bool else
                                (str if getattr(hint, "__origin__", None) is tuple else hint),
                                metavar=None if hint is bool else f.name.upper(),
                                help=f"{text} [default: {str(shown).replace('%', '%%')}]")
            continue
        if hint is bool:
            if f.default is True:
                parser.add_argument("--no-" + dashed, dest=f.name, action="store_false",
                                    help=f"{text[:-1] if text.endswith('.') else text} "
                                    f"(default: on; --no-{dashed} turns it off).")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        parser.add_argument(flag, dest=f.name, type=hint,
                            default=f.default if f.default is not MISSING else None,
                            help=text)


def given_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` the user gave (flags added with ``unset=True``)."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if getattr(args, f.name, None) is not None}


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The options dataclass from parsed arguments (validated)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
