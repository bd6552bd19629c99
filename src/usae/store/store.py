"""The activation store (read side and layout; ``usae.store.writer`` builds it): one
folder, one memory-mapped array per model, one JSON manifest.

Layout::

    STORE/manifest.json          schema version, models, images, splits, stats, state
    STORE/acts_<model>.bin       (n_images, tokens, d) raw little-endian fp16/bf16/fp32
    STORE/progress.safetensors   only while building: rows done, skips, stat accumulators

Every image in the manifest owns one row of every array, skipped images included (their
rows stay zero and are never read), so a resumed build writes exactly the rows it had not
committed. A committed row is one whose batch was written and fsynced before
``progress.safetensors`` was atomically replaced. A finalized store is never written again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from usae.data.align import square_grid
from usae.errors import UsaeError
from usae.files import (
    read_json,
)
from usae.store.stats import ModelStats

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.safetensors"
SUMS = "sums.safetensors"  # a shard's raw statistics sums, for an exact merge
DTYPES = {"float16": (np.float16, 2), "bfloat16": (np.uint16, 2), "float32": (np.float32, 4)}


def acts_file(store: Path, model: str) -> Path:
    return store / f"acts_{model}.bin"


@dataclass
class ModelEntry:
    """What the manifest says about one model's array."""

    name: str
    d: int
    tokens: int
    info: dict[str, Any]

    def as_manifest(self) -> dict[str, Any]:
        """The entry as the manifest writes it (``d``, ``tokens`` and ``info``'s keys)."""
        return {"d": self.d, "tokens": self.tokens, **self.info}


def to_storage(x: np.ndarray | Tensor, dtype: str) -> np.ndarray:
    """float activations -> the on-disk representation of ``dtype``."""
    t = torch.as_tensor(x)
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).numpy()


def storage_tensor(a: np.ndarray, dtype: str) -> Tensor:
    """On-disk representation -> a tensor of the storage dtype (no copy when contiguous):
    bfloat16 is stored as its 16 bits and viewed back as ``torch.bfloat16``."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else t


def from_storage(a: np.ndarray, dtype: str) -> Tensor:
    """On-disk representation -> float32 tensor."""
    return storage_tensor(a, dtype).float()


def contiguous_runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` position ranges of ``sorted_rows`` whose values are consecutive."""
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    return [(lo, hi) for lo, hi in zip([0, *breaks], [*breaks, len(sorted_rows)]) if hi > lo]


def content_hash(path: Path, manifest: dict[str, Any]) -> str:
    """SHA-256 over the image list, the dtype and every byte of every array (in model order).

    Reading everything costs one sequential pass at disk speed when the store is finalized
    (SHA-256 runs at GB/s); it is what lets ``Store.verify`` catch any damaged row."""
    h = hashlib.sha256(json.dumps([[i["path"] for i in manifest["images"]],
                                   manifest.get("dtype")]).encode())
    for name in manifest["models"]:
        h.update(name.encode() + b"\0")
        with open(acts_file(path, name), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()


def split_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """Images per split, skipped images left out."""
    out: dict[str, int] = {}
    for img in manifest["images"]:
        if not img.get("skipped"):
            out[img["split"]] = out.get(img["split"], 0) + 1
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise UsaeError(f"{path} is not a usae store ({MANIFEST} is missing)")
    manifest = read_json(path / MANIFEST, "store manifest")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise UsaeError(f"{path / MANIFEST} has no schema_version; is it a usae store?")
    if version > SCHEMA_VERSION:
        raise UsaeError(f"{path} was written by a newer usae (store schema {version}, this "
                        f"version reads up to {SCHEMA_VERSION}); upgrade usae")
    return manifest


class Store:
    """Read side of a finalized store: arrays, splits, statistics."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest["state"] != "final":
            raise UsaeError(f"{self.path} is not finished (state {self.manifest['state']!r}); "
                            "re-run the command that builds it to resume")
        self.dtype = self.manifest["dtype"]
        self.models = tuple(self.manifest["models"])
        self.dims = tuple(int(self.manifest["models"][m]["d"]) for m in self.models)
        self.tokens = int(self.manifest["models"][self.models[0]]["tokens"])
        n = len(self.manifest["images"])
        self._arrays = {}
        for m in self.models:
            info = self.manifest["models"][m]
            np_dtype, itemsize = DTYPES[self.dtype]
            file = acts_file(self.path, m)
            expected = n * info["tokens"] * info["d"] * itemsize
            if not file.exists() or os.path.getsize(file) != expected:
                raise UsaeError(f"{file} is missing or has the wrong size (expected {expected} "
                                "bytes); the store is damaged")
            self._arrays[m] = np.memmap(file, dtype=np_dtype, mode="r",
                                        shape=(n, info["tokens"], info["d"]))

    def grid(self) -> list[int]:
        """The aligned token grid ``[h, w]`` (square from the token count for imports)."""
        info = self.manifest["models"][self.models[0]]
        if info.get("aligned_grid"):
            return list(info["aligned_grid"])
        tokens = self.tokens - (1 if info.get("keep_cls") else 0)
        return list(square_grid(tokens)[1])

    def model(self, name: str) -> ModelEntry:
        """The manifest's entry of model ``name``: its width, tokens per image and the rest
        (``info``: spec, layer, aligned grid, CLS choice...)."""
        if name not in self.manifest["models"]:
            raise UsaeError(f"the store has no model {name!r}; it has {list(self.models)}")
        entry = self.manifest["models"][name]
        return ModelEntry(name, int(entry["d"]), int(entry["tokens"]),
                          {k: v for k, v in entry.items() if k not in ("d", "tokens")})

    def array(self, model: str) -> np.ndarray:
        """Raw memory-mapped (n_rows, tokens, d) array in storage dtype."""
        return self._arrays[model]

    def prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read these rows ahead (``POSIX_FADV_WILLNEED``), asynchronously,
        in contiguous runs: a cold read then streams instead of faulting page by page."""
        if not hasattr(os, "posix_fadvise") or len(rows) == 0:
            return
        rows = np.sort(np.asarray(rows))
        runs = contiguous_runs(rows)
        for m in self.models:
            arr = self._arrays[m]
            row_bytes = arr.shape[1] * arr.shape[2] * arr.itemsize
            fd = os.open(acts_file(self.path, m), os.O_RDONLY)
            try:
                for lo, hi in runs:
                    os.posix_fadvise(fd, int(rows[lo]) * row_bytes, (hi - lo) * row_bytes,
                                     os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def splits(self) -> dict[str, int]:
        return split_counts(self.manifest)

    def rows(self, split: str = "all") -> np.ndarray:
        """Row indices of the non-skipped images of ``split`` ('all' for every split)."""
        rows = [i for i, img in enumerate(self.manifest["images"])
                if not img.get("skipped") and (split == "all" or img["split"] == split)]
        if not rows:
            raise UsaeError(f"split {split!r} of {self.path} is empty; splits: {self.splits()}")
        return np.asarray(rows, dtype=np.int64)

    def stats(self) -> dict[str, ModelStats]:
        return {m: ModelStats.from_json(self.manifest["stats"][m]) for m in self.models}

    def verify(self) -> bool:
        """True when the arrays still hash to the manifest's ``content_hash``."""
        return content_hash(self.path, self.manifest) == self.manifest.get("content_hash")

    def info(self) -> dict[str, Any]:
        return {"models": {m: {"d": int(self.manifest["models"][m]["d"]),
                               "tokens": int(self.manifest["models"][m]["tokens"])}
                           for m in self.models},
                "n_images": int(self.manifest["n_images"]),
                "splits": self.splits(),
                "dtype": self.dtype,
                "schema_version": self.manifest["schema_version"],
                "skipped": sum(1 for i in self.manifest["images"] if i.get("skipped")),
                "content_hash": self.manifest.get("content_hash")}

    def read(self, model: str, rows: np.ndarray) -> Tensor:
        """float32 (len(rows), tokens, d) for sorted or unsorted rows, reading contiguous runs."""
        arr = self._arrays[model]
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((len(rows),) + arr.shape[1:], dtype=arr.dtype)
        for lo, hi in contiguous_runs(sorted_rows):
            out[lo:hi] = arr[sorted_rows[lo]:sorted_rows[hi - 1] + 1]
        result = np.empty_like(out)
        result[order] = out
        return from_storage(result, self.dtype)


def earlier_hashes(manifest: dict[str, Any]) -> set[str]:
    """The content hashes a store had before models were added to it (``usae store
    add-model`` records them in ``history``): a run trained on it then still matches."""
    return {str(h["previous_content_hash"]) for h in manifest.get("history", [])}
