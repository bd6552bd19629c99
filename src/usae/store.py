"""The activation store: one folder, one memory-mapped array per model, one JSON manifest.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from usae.align import square_grid
from usae.errors import UsaeError
from usae.files import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from usae.sources import ModelStats, StatsAccumulator, epoch_permutation, pairing_permutations
from usae.splits import assign_splits

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.safetensors"
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
                raise UsaeError(f"cannot reserve {_human_bytes(size)} for {m.name!r} in "
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


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size} B"


def content_hash(path: Path, manifest: dict[str, Any]) -> str:
    """SHA-256 over the image list and the first and last MiB of every array (cheap, stable)."""
    h = hashlib.sha256(json.dumps([i["path"] for i in manifest["images"]]).encode())
    for name in manifest["models"]:
        with open(acts_file(path, name), "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(os.path.getsize(acts_file(path, name)) - (1 << 20), 0))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


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
        out: dict[str, int] = {}
        for img in self.manifest["images"]:
            if not img.get("skipped"):
                out[img["split"]] = out.get(img["split"], 0) + 1
        return out

    def rows(self, split: str = "all") -> np.ndarray:
        """Row indices of the non-skipped images of ``split`` ('all' for every split)."""
        rows = [i for i, img in enumerate(self.manifest["images"])
                if not img.get("skipped") and (split == "all" or img["split"] == split)]
        if not rows:
            raise UsaeError(f"split {split!r} of {self.path} is empty; splits: {self.splits()}")
        return np.asarray(rows, dtype=np.int64)

    def stats(self) -> dict[str, ModelStats]:
        return {m: ModelStats.from_json(self.manifest["stats"][m]) for m in self.models}

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


class StoreSource:
    """A ``DataSource`` over one split of a store, read in shuffled chunks.

    Each epoch shuffles chunks of ``chunk_images`` consecutive images, fills a buffer of
    ``buffer_chunks`` chunks with contiguous reads, shuffles images inside the buffer, and
    yields batches of whole images. Order is a pure function of (seed, epoch).
    """

    def __init__(self, store: Store | str | Path, split: str = "train", chunk_images: int = 64,
                 buffer_chunks: int = 8) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.split = split
        self._rows = self.store.rows(split)
        self.models = self.store.models
        self.dims = self.store.dims
        self.chunk_images = chunk_images
        self.buffer_chunks = buffer_chunks

    def n_images(self) -> int:
        return len(self._rows)

    def tokens_per_image(self) -> int:
        return self.store.tokens

    def stats(self) -> dict[str, ModelStats]:
        return self.store.stats()

    def image_order(self, seed: int, epoch: int) -> np.ndarray:
        """Positions into this split's rows, chunk-shuffled then buffer-shuffled."""
        n = len(self._rows)
        c = self.chunk_images
        chunks = [np.arange(s, min(s + c, n)) for s in range(0, n, c)]
        chunk_order = epoch_permutation(len(chunks), seed, epoch, salt=1)
        rng = np.random.default_rng([seed, epoch, 2])
        out = []
        for g in range(0, len(chunk_order), self.buffer_chunks):
            buf = np.concatenate([chunks[i] for i in chunk_order[g:g + self.buffer_chunks]])
            out.append(buf[rng.permutation(len(buf))])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False) -> Iterator[dict[str, Tensor]]:
        """Batches of ``batch_images`` whole images: ``{model: (B * tokens, d)}`` in the
        storage dtype (fp16/bf16/fp32; the trainer converts on its device). One gather of
        whole-image rows per model and batch, from a window of a few contiguous chunks."""
        order = self.image_order(seed, epoch)
        perms = (pairing_permutations(self.models, len(self._rows), seed)
                 if shuffle_pairing else None)
        span = self.chunk_images * self.buffer_chunks
        window = -1
        for b in range(start, len(order) // batch_images):
            pos = order[b * batch_images:(b + 1) * batch_images]
            if perms is None and (b * batch_images) // span != window:
                # this window (when starting) and the next one, read ahead while we gather
                first = window < 0
                window = (b * batch_images) // span
                lo = window * span if first else (window + 1) * span
                self.store.prefetch(self._rows[order[lo:(window + 2) * span]])
            yield {m: self._gather(m, self._rows[perms[m][pos] if perms else pos])
                   for m in self.models}

    def _gather(self, model: str, rows: np.ndarray) -> Tensor:
        """(len(rows) * tokens, d) in the storage dtype."""
        a = self.store.array(model)[rows]
        return storage_tensor(a.reshape(-1, a.shape[-1]), self.store.dtype)


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
