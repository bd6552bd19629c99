"""Building an activation store: create or resume, commit batches in order, finalize.

A committed row is one whose batch was written and fsynced before ``progress.safetensors``
was atomically replaced; a resumed build writes exactly the rows it had not committed.
The manifest is written first (state ``building``), so every later file in the folder is
recognized as this store's on a re-run, whatever point a failure or a kill stopped at.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from usae.errors import UsaeError
from usae.files import (
    atomic_save_safetensors,
    atomic_write_json,
    human_bytes,
    load_safetensors,
    remove_stale_temps,
)
from usae.splits import assign_splits
from usae.stats import StatsAccumulator
from usae.store import (
    DTYPES,
    MANIFEST,
    PROGRESS,
    SCHEMA_VERSION,
    ModelEntry,
    Store,
    acts_file,
    content_hash,
    read_manifest,
    to_storage,
)


class StoreWriter:
    """Creates or resumes a store and commits rows in order, atomically per batch."""

    def __init__(self, path: str | Path, models: list[ModelEntry], images: list[dict[str, Any]],
                 dtype: str = "float16", extra: dict[str, Any] | None = None) -> None:
        if dtype not in DTYPES:
            raise UsaeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not images:
            raise UsaeError("no images to store")
        self.path = Path(path)
        self.dtype = dtype
        self.models = models
        self.manifest = {
            "schema_version": SCHEMA_VERSION,
            "state": "building",
            "dtype": dtype,
            "models": {m.name: {"d": m.d, "tokens": m.tokens, **m.info} for m in models},
            "images": images,
            **(extra or {}),
        }
        self.done = 0
        self.skipped: dict[int, str] = {}
        self.acc = {m.name: StatsAccumulator(m.d) for m in models}
        self._open()

    # -- creation and resume ------------------------------------------------------------
    def _open(self) -> None:
        manifest_path = self.path / MANIFEST
        remove_stale_temps(self.path)
        if manifest_path.exists():
            old = read_manifest(self.path)
            if old["state"] == "final":
                raise UsaeError(f"{self.path} is a finalized store; it is never modified — "
                                "choose another --out")
            self._check_same(old)
            if (self.path / PROGRESS).exists():
                self._load_progress()
                return
            # stopped between the manifest and the first progress file: nothing committed
        elif self.path.exists() and any(self.path.iterdir()):
            raise UsaeError(f"{self.path} exists and is not a usae store — choose an empty "
                            "folder")
        else:
            # the manifest comes first, so every later file is recognized as ours on re-run
            atomic_write_json(manifest_path, self.manifest)
        self._reserve()
        self._save_progress()

    def _reserve(self) -> None:
        """Allocate every model's array at its full size (fails early when space is short)."""
        n = len(self.manifest["images"])
        for m in self.models:
            size = n * m.tokens * m.d * DTYPES[self.dtype][1]
            try:
                with open(acts_file(self.path, m.name), "wb") as fh:
                    os.posix_fallocate(fh.fileno(), 0, size)
            except OSError as err:
                raise UsaeError(f"cannot reserve {human_bytes(size)} for {m.name!r} in "
                                f"{self.path}: {err.strerror} — free some space and re-run "
                                "the same command") from None

    def _check_same(self, old: dict[str, Any]) -> None:
        for key in ("dtype", "models"):
            if old.get(key) != json.loads(json.dumps(self.manifest[key])):
                raise UsaeError(f"{self.path} was started with different {key}; resume with the "
                                "same command or choose another --out")
        if [i["path"] for i in old["images"]] != [i["path"] for i in self.manifest["images"]]:
            raise UsaeError(f"{self.path} was started on a different image list; resume with "
                            "the same images or choose another --out")
        self.manifest = old

    def _save_progress(self) -> None:
        tensors = {}
        for name, acc in self.acc.items():
            tensors[f"sum.{name}"] = torch.from_numpy(acc.sum_d)
            tensors[f"sumsq.{name}"] = torch.from_numpy(acc.sumsq_d)
            tensors[f"count.{name}"] = torch.tensor([acc.count], dtype=torch.int64)
        meta = {"done": str(self.done),
                "skipped": json.dumps({str(k): v for k, v in self.skipped.items()})}
        atomic_save_safetensors(self.path / PROGRESS, tensors, metadata=meta)

    def _load_progress(self) -> None:
        from safetensors import safe_open

        path = self.path / PROGRESS
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_safetensors(path)
            self.done = int(meta["done"])
            self.skipped = {int(k): v for k, v in json.loads(meta["skipped"]).items()}
            for name, acc in self.acc.items():
                acc.sum_d = tensors[f"sum.{name}"].numpy().astype(np.float64)
                acc.sumsq_d = tensors[f"sumsq.{name}"].numpy().astype(np.float64)
                acc.count = int(tensors[f"count.{name}"][0])
        except (KeyError, ValueError, UsaeError) as err:
            raise UsaeError(f"{path} is unreadable ({err}); delete {self.path} and start "
                            "again") from None

    # -- writing ------------------------------------------------------------------------
    def commit(self, start: int, acts: dict[str, np.ndarray | Tensor],
               skipped: dict[int, str]) -> None:
        """Write rows ``start..start+B`` for every model, then record them as done.

        ``acts[m]``: (B, tokens, d) for the B images of this batch (skipped images' rows are
        written as zeros). ``skipped``: image index -> reason.
        """
        if start != self.done:
            raise UsaeError(f"internal: commit at row {start} but {self.done} rows are done")
        count = None
        for m in self.models:
            a = acts[m.name]
            if tuple(a.shape[1:]) != (m.tokens, m.d):
                raise UsaeError(f"model {m.name!r}: got activations of shape {tuple(a.shape)}, "
                                f"the store expects (B, {m.tokens}, {m.d})")
            count = a.shape[0] if count is None else count
            if a.shape[0] != count:
                raise UsaeError("internal: models disagree on the batch size")
        for m in self.models:
            a = acts[m.name]
            t = torch.as_tensor(a).float()
            if not torch.isfinite(t).all():
                raise UsaeError(f"model {m.name!r}: non-finite activations in images "
                                f"{start}..{start + count - 1}")
            keep = [i for i in range(count) if start + i not in skipped]
            if keep:
                self.acc[m.name].update(t[keep].reshape(-1, m.d).numpy())
            self._write_rows(m, start, to_storage(t, self.dtype))
        self.skipped.update(skipped)
        self.done = start + count
        self._save_progress()

    def _write_rows(self, m: ModelEntry, start: int, rows: np.ndarray) -> None:
        row_bytes = m.tokens * m.d * DTYPES[self.dtype][1]
        data = np.ascontiguousarray(rows).tobytes()
        try:
            fd = os.open(acts_file(self.path, m.name), os.O_WRONLY)
            try:
                view = memoryview(data)
                offset = start * row_bytes
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise UsaeError(f"writing {acts_file(self.path, m.name)} failed ({err.strerror}); "
                            f"the {self.done} images committed so far are safe: free space and "
                            "re-run the same command to resume") from None

    def finalize(self) -> dict[str, Any]:
        """Compute statistics, hash, and mark the store final (immutable from now on)."""
        n = len(self.manifest["images"])
        if self.done != n:
            raise UsaeError(f"internal: finalize with {self.done}/{n} rows done")
        for idx, reason in self.skipped.items():
            self.manifest["images"][idx]["skipped"] = reason
        kept = n - len(self.skipped)
        if kept == 0:
            raise UsaeError("every image was skipped; nothing to store (see the reasons in "
                            f"{self.path / MANIFEST})")
        self.manifest["stats"] = {name: acc.result().to_json() for name, acc in self.acc.items()}
        self.manifest["n_images"] = kept
        self.manifest["state"] = "final"
        self.manifest["finalized_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest["content_hash"] = content_hash(self.path, self.manifest)
        atomic_write_json(self.path / MANIFEST, self.manifest)
        (self.path / PROGRESS).unlink(missing_ok=True)
        return self.manifest


def store_from_arrays(path: str | Path, arrays: dict[str, np.ndarray], dtype: str = "float16",
                      splits: list[str] | None = None, seed: int = 0, batch: int = 256,
                      paths: list[str] | None = None) -> Store:
    """Write in-memory ``{model: (n_images, tokens, d)}`` arrays as a finalized store
    (``paths``: the image files the rows stand for, if any)."""
    models = list(arrays)
    n = int(np.asarray(arrays[models[0]]).shape[0])
    entries = [ModelEntry(m, int(a.shape[2]), int(a.shape[1]), {"spec": f"array:{m}"})
               for m, a in arrays.items()]
    images = [{"path": paths[i] if paths else f"array/{i}", "label": None} for i in range(n)]
    assign_splits(images, splits or [None] * n, seed)
    writer = StoreWriter(path, entries, images, dtype)
    for start in range(writer.done, n, batch):
        writer.commit(start, {m: np.asarray(a[start:start + batch]) for m, a in arrays.items()},
                      {})
    writer.finalize()
    return Store(path)
