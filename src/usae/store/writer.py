"""Building an activation store: create or resume, commit batches in order, finalize.

A committed row is one whose batch was written and fsynced before ``progress.safetensors``
was atomically replaced; a resumed build writes exactly the rows it had not committed.
The manifest is written first (state ``building``), so every later file in the folder is
recognized as this store's on a re-run, whatever point a failure or a kill stopped at.

Several writers (``torchrun`` ranks) may build one store together: writer 0 creates it, each
writes its own contiguous ``Part`` of the rows and keeps its own progress file
(``progress.rank<R>of<N>.safetensors``), and writer 0 finalizes once every part is done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae.data.splits import assign_splits
from usae.errors import UsaeError
from usae.files import (
    atomic_save_safetensors,
    atomic_write_json,
    human_bytes,
    load_safetensors,
    remove_stale_temps,
)
from usae.store.stats import StatsAccumulator
from usae.store.store import (
    DTYPES,
    MANIFEST,
    PROGRESS,
    SCHEMA_VERSION,
    SUMS,
    ModelEntry,
    Store,
    acts_file,
    content_hash,
    read_manifest,
    to_storage,
)


class Part(NamedTuple):
    """Rows ``[lo, hi)`` of a store, written by writer ``rank`` of ``world``."""

    lo: int
    hi: int
    rank: int = 0
    world: int = 1

    @property
    def progress_file(self) -> str:
        return progress_name(self.rank, self.world)


def progress_name(rank: int, world: int) -> str:
    """The progress file of writer ``rank`` of ``world`` (one writer: ``PROGRESS``)."""
    return PROGRESS if world == 1 else f"progress.rank{rank}of{world}.safetensors"


class StoreWriter:
    """Creates or resumes a store and commits rows in order, atomically per batch.

    ``part``: the rows this writer commits (default: all); writer 0 creates the store."""

    def __init__(self, path: str | Path, models: list[ModelEntry], images: list[dict[str, Any]],
                 dtype: str = "float16", extra: dict[str, Any] | None = None,
                 part: Part | None = None) -> None:
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
        self.part = part or Part(0, len(images))
        self.done = self.part.lo
        self.skipped: dict[int, str] = {}
        self.acc = {m.name: StatsAccumulator(m.d) for m in models}
        self._open()

    # -- creation and resume ------------------------------------------------------------
    def _open(self) -> None:
        manifest_path = self.path / MANIFEST
        if self.part.rank == 0:
            remove_stale_temps(self.path)
        if manifest_path.exists():
            old = read_manifest(self.path)
            if old["state"] == "final":
                raise UsaeError(f"{self.path} is a finalized store; it is never modified — "
                                "choose another --out")
            self._check_same(old)
            self._check_layout()
            if (self.path / self.part.progress_file).exists():
                self._load_progress()
                return
            if self.part.rank > 0:  # writer 0 reserved the files; this part has no rows yet
                self._save_progress()
                return
            # stopped between the manifest and the first progress file: nothing committed
        elif self.part.rank > 0:
            raise UsaeError(f"internal: writer {self.part.rank} opened {self.path} before "
                            "writer 0 created it")
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

    def _check_layout(self) -> None:
        """Progress files of another number of writers: refuse (their rows are elsewhere)."""
        others = sorted(p.name for p in self.path.glob("progress*.safetensors")
                        if not _same_world(p.name, self.part.world))
        if others:
            raise UsaeError(f"{self.path} was started by a different number of processes "
                            f"({', '.join(others)}); resume it with the same number")

    def _sum_tensors(self) -> dict[str, Tensor]:
        tensors = {}
        for name, acc in self.acc.items():
            tensors[f"sum.{name}"] = torch.from_numpy(acc.sum_d)
            tensors[f"sumsq.{name}"] = torch.from_numpy(acc.sumsq_d)
            tensors[f"count.{name}"] = torch.tensor([acc.count], dtype=torch.int64)
        return tensors

    def _save_progress(self) -> None:
        tensors = self._sum_tensors()
        meta = {"done": str(self.done), "lo": str(self.part.lo), "hi": str(self.part.hi),
                "skipped": json.dumps({str(k): v for k, v in self.skipped.items()})}
        atomic_save_safetensors(self.path / self.part.progress_file, tensors, metadata=meta)

    def _load_progress(self) -> None:
        done, lo, hi, self.skipped, self.acc = read_progress(
            self.path / self.part.progress_file, self.acc)
        if hi >= 0 and (lo, hi) != (self.part.lo, self.part.hi):
            raise UsaeError(f"{self.path}: this process's rows were {lo}..{hi}, now "
                            f"{self.part.lo}..{self.part.hi}; resume with the same command")
        self.done = done

    # -- writing ------------------------------------------------------------------------
    def commit(self, start: int, acts: dict[str, np.ndarray | Tensor],
               skipped: dict[int, str]) -> None:
        """Write rows ``start..start+B`` for every model, then record them as done.

        ``acts[m]``: (B, tokens, d) for the B images of this batch (skipped images' rows are
        written as zeros). ``skipped``: image index -> reason.
        """
        if start != self.done:
            raise UsaeError(f"internal: commit at row {start} but {self.done} rows are done")
        if start + len(next(iter(acts.values()))) > self.part.hi:
            raise UsaeError(f"internal: rows past {self.part.hi} belong to another writer")
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
                self.acc[m.name].update(t[keep].numpy())  # (kept, tokens, d): it flattens
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

    def finalize(self, keep_sums: bool = False) -> dict[str, Any]:
        """Compute statistics, hash, and mark the store final (immutable from now on).
        With several writers, writer 0 calls it once every part is committed. ``keep_sums``:
        also keep the raw sums (``sums.safetensors``), so shards merge exactly."""
        n = len(self.manifest["images"])
        if self.part.world > 1:
            self._gather_parts()
        elif self.done != n:
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
        if keep_sums:
            atomic_save_safetensors(self.path / SUMS, self._sum_tensors())
        atomic_write_json(self.path / MANIFEST, self.manifest)
        for p in self.path.glob("progress*.safetensors"):
            p.unlink(missing_ok=True)
        return self.manifest

    def _gather_parts(self) -> None:
        """Every writer's statistics and skipped images, in part order; all parts done."""
        total = {m.name: StatsAccumulator(m.d) for m in self.models}
        skipped: dict[int, str] = {}
        covered = 0
        for rank in range(self.part.world):
            path = self.path / progress_name(rank, self.part.world)
            if not path.exists():
                raise UsaeError(f"{path.name} is missing: process {rank} never started")
            done, lo, hi, part_skipped, accs = read_progress(
                path, {m.name: StatsAccumulator(m.d) for m in self.models})
            if lo != covered or done != hi:
                raise UsaeError(f"process {rank} committed rows {lo}..{done} of {lo}..{hi}; "
                                "re-run the same command to finish it")
            covered = hi
            skipped.update(part_skipped)
            for name, acc in accs.items():
                total[name].merge(acc)
        if covered != len(self.manifest["images"]):
            raise UsaeError(f"internal: the parts cover {covered} of "
                            f"{len(self.manifest['images'])} rows")
        self.acc, self.skipped, self.done = total, skipped, covered


def wait_for_parts(path: Path, world: int, poll_s: float = 2.0) -> None:
    """Block until every writer's progress file says its part is done (writers finish at
    different times: waiting on the files needs no collective timeout)."""
    while True:
        waiting = 0
        for rank in range(world):
            progress = path / progress_name(rank, world)
            if not progress.exists():
                waiting += 1
                continue
            meta = _progress_meta(progress)  # the header only: polled every few seconds
            waiting += meta["done"] != meta["hi"]
        if not waiting:
            return
        time.sleep(poll_s)


def _same_world(name: str, world: int) -> bool:
    return name == PROGRESS if world == 1 else name.endswith(f"of{world}.safetensors")


def sums_into(tensors: dict[str, Tensor], accs: dict[str, StatsAccumulator]
              ) -> dict[str, StatsAccumulator]:
    """Fill ``accs`` from the tensors ``_sum_tensors`` wrote (progress and shard sums)."""
    for name, acc in accs.items():
        acc.sum_d = tensors[f"sum.{name}"].numpy().astype(np.float64)
        acc.sumsq_d = tensors[f"sumsq.{name}"].numpy().astype(np.float64)
        acc.count = int(tensors[f"count.{name}"][0])
    return accs


def _progress_meta(path: Path) -> dict[str, Any]:
    """The header of a progress file: done, lo, hi (-1 in files of older versions), skipped."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        return {"done": int(meta["done"]), "lo": int(meta.get("lo", 0)),
                "hi": int(meta.get("hi", -1)),
                "skipped": {int(k): v for k, v in json.loads(meta["skipped"]).items()}}
    except (KeyError, ValueError) as err:
        raise UsaeError(f"{path} is unreadable ({err}); delete {path.parent} and start "
                        "again") from None


def read_progress(path: Path, accs: dict[str, StatsAccumulator]
                  ) -> tuple[int, int, int, dict[int, str], dict[str, StatsAccumulator]]:
    """(done, lo, hi, skipped, statistics) of one writer's progress file."""
    meta = _progress_meta(path)
    try:
        sums_into(load_safetensors(path), accs)
    except (KeyError, ValueError, UsaeError) as err:
        raise UsaeError(f"{path} is unreadable ({err}); delete {path.parent} and start "
                        "again") from None
    return meta["done"], meta["lo"], meta["hi"], meta["skipped"], accs


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
