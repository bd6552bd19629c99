"""``usae cache``: images -> backbones -> aligned tokens -> the activation store.

Each image is decoded once (in threads, ``usae.data.image_decoding``) and preprocessed for
every model; batches go through every backbone, tokens are aligned to the common grid and
committed to the store in order. Re-running the same command on the same store resumes after
the last committed batch. Memory is bounded by three batches (one in the backbones, two
decoded ahead).

Under ``torchrun``, rank r takes a contiguous range of whole batches of the image list (the
same batches one process would run, so the rows are the same bytes); the ranks write one
store together, rank 0 finalizing it when every range is done, or, with ``shard_dir``, a
store each (``shard-R-of-N``) that ``usae.store.merge`` joins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from usae.data.align import align_tokens
from usae.data.backbones import build_backbones, expand_specs
from usae.data.backbones.base import Backbone
from usae.data.image_decoding import ImageDataset, batch_pixels, decoded_batches
from usae.data.images import list_images
from usae.distributed import Dist, shard_range
from usae.errors import UsaeError
from usae.malloc import keep_freed_memory
from usae.options import CacheOptions, merged
from usae.progress import bar as progress_bar
from usae.store.store import MANIFEST, ModelEntry, read_manifest
from usae.store.writer import Part, StoreWriter, wait_for_parts

log = logging.getLogger(__name__)


def model_entries(backbones: list[Backbone], target: tuple[int, int],
                  keep_cls: bool) -> list[ModelEntry]:
    tokens = target[0] * target[1] + (1 if keep_cls else 0)
    return [ModelEntry(b.name, b.d, tokens, {**b.info(), "aligned_grid": list(target),
                                              "keep_cls": keep_cls}) for b in backbones]


def extract_batch(backbones: list[Backbone], pixels: dict[str, Tensor],
                  target: tuple[int, int], keep_cls: bool) -> dict[str, Tensor]:
    """(B, 3, H_m, W_m) per model -> aligned (B, tokens, d_m) float32 on the CPU."""
    out = {}
    for b in backbones:
        acts = b.extract(pixels[b.name])
        out[b.name] = align_tokens(acts, b.n_prefix, b.grid, target, keep_cls).float().cpu()
    return out


def cache(models: str | list[str], images: str | Path, out: str | Path,
          options: CacheOptions | None = None, *, pretrained: bool | None = None,
          progress: bool = True, timings: dict[str, float] | None = None,
          dist: Dist | None = None, **changes: Any) -> dict[str, Any]:
    """Extract aligned activations of several models for a folder of images into a store.

    ``options`` (or keyword ``changes`` to the defaults, e.g. ``batch_size=16``): see
    ``CacheOptions``. ``timings``, when given, receives ``seconds``, ``images_per_s`` and
    ``forward_seconds`` of the extraction loop. ``dist``: the processes sharing the work (by
    default the ``torchrun`` job this process belongs to, if any).
    """
    o = merged(CacheOptions, options, changes)
    own = dist is None
    dist = dist or Dist.from_env(o.device)
    try:
        return _cache(expand_specs(models), images, Path(out), o, pretrained,
                      progress and dist.is_main, timings, dist)
    finally:
        if own:
            dist.close()


def _cache(specs: list[str], images: str | Path, out: Path, o: CacheOptions,
           pretrained: bool | None, progress: bool, timings: dict[str, float] | None,
           dist: Dist) -> dict[str, Any]:
    # the backbones' activations page-fault in afresh otherwise: CPU forward passes take
    # twice as long, half of it in the kernel (benchmarks/cache.py)
    keep_freed_memory(o.device)
    entries = list_images(images, val_fraction=o.val_fraction, seed=o.split_seed)
    backbones, target = build_backbones(specs, pretrained=pretrained, align=o.align)
    extra = {"source": str(Path(images).resolve()), "align": o.align}
    return build_store(out, entries, backbones, target, o, extra, progress, timings, dist)


def build_store(out: Path, entries: list[dict[str, Any]], backbones: list[Backbone],
                target: tuple[int, int], o: CacheOptions, extra: dict[str, Any],
                progress: bool, timings: dict[str, float] | None, dist: Dist
                ) -> dict[str, Any]:
    """Extract ``backbones`` on ``entries`` (``[{path, label, split}]``, in store order),
    aligned to ``target``, into the store ``out`` (created or resumed; ``extra``: manifest
    keys), shared among ``dist``'s ranks; returns the final manifest."""
    list_text = json.dumps([[e["path"], e.get("split")] for e in entries])
    dist.agree("image lists", list_text)
    for b in backbones:
        b.to(dist.device(o.device))
    n_batches = -(-len(entries) // o.batch_size)
    lo, hi = (min(b * o.batch_size, len(entries))
              for b in shard_range(n_batches, dist.rank, dist.world))
    if n_batches < dist.world:
        raise UsaeError(f"{dist.world} processes for {n_batches} batches of {o.batch_size} "
                        "images: use fewer processes or a smaller --batch-size")
    writer, todo = _open_writer(out, model_entries(backbones, target, o.keep_cls), entries,
                                o, extra, (lo, hi), list_text, dist)
    if writer is None:  # an earlier run of this job finalized this rank's shard
        shard = _shard_path(o, dist)
        log.info("%s is already complete", shard)
        return read_manifest(shard)
    if writer.done > writer.part.lo:
        log.info("resuming %s: %d of %d images already stored", writer.path,
                 writer.done - writer.part.lo, writer.part.hi - writer.part.lo)
    workers = o.resolved_workers(o.device)
    stats = run_extraction(writer, backbones, target, todo, o.batch_size, workers, o.keep_cls,
                           progress)
    if o.shard_dir:
        manifest = writer.finalize(keep_sums=True)
    elif dist.is_main:
        if dist.enabled:
            wait_for_parts(out, dist.world)
        manifest = writer.finalize()
    else:
        return read_manifest(out)  # the others' rows may still be in flight
    if timings is not None:
        timings.update(stats)
    log.info("stored %d images (%d skipped) for %s in %.1fs (%.1f images/s) -> %s",
             manifest["n_images"], len(writer.skipped), ", ".join(b.name for b in backbones),
             stats["seconds"], stats["images_per_s"], writer.path)
    return manifest


def _shard_path(o: CacheOptions, dist: Dist) -> Path:
    return Path(o.shard_dir) / f"shard-{dist.rank:05d}-of-{dist.world:05d}"


def _finished_shard(path: Path, shard: dict[str, Any]) -> bool:
    """Whether ``path`` is this rank's shard of this job, finalized by an earlier run (the
    rank finished before another failed: re-running the job must not stop on it)."""
    if not (path / MANIFEST).exists():
        return False
    manifest = read_manifest(path)
    return manifest.get("state") == "final" and manifest.get("shard") == shard


def _open_writer(out: Path, models: list[ModelEntry], entries: list[dict[str, Any]],
                 o: CacheOptions, extra: dict[str, Any], rows: tuple[int, int], list_text: str,
                 dist: Dist) -> tuple[StoreWriter | None, list[str]]:
    """This rank's writer and the paths it still has to extract (rank 0 creates a shared
    store before the others open it); no writer when this rank's shard is already final."""
    extra = dict(extra)
    lo, hi = rows
    if o.shard_dir:
        path = _shard_path(o, dist)
        extra["shard"] = {"index": dist.rank, "count": dist.world, "start": lo,
                          "n_total": len(entries),
                          "list_hash": hashlib.sha256(list_text.encode()).hexdigest()}
        if _finished_shard(path, extra["shard"]):
            return None, []
        writer = StoreWriter(path, models, entries[lo:hi], o.dtype, extra=extra)
        return writer, [e["path"] for e in entries[lo + writer.done:hi]]
    part = Part(lo, hi, dist.rank, dist.world)
    if dist.is_main:  # the store's creator, so the one whose extras it records
        writer = StoreWriter(out, models, entries, o.dtype, extra=extra, part=part)
    dist.barrier()
    if not dist.is_main:
        writer = StoreWriter(out, models, entries, o.dtype, part=part)
    return writer, [e["path"] for e in entries[writer.done:hi]]


def run_extraction(writer: StoreWriter, backbones: list[Backbone], target: tuple[int, int],
                   paths: list[str], batch_size: int, workers: int, keep_cls: bool,
                   progress: bool) -> dict[str, float]:
    """Decode, extract and commit ``paths`` (the images after ``writer.done``), in order."""
    dataset = ImageDataset(paths, {b.name: b.preprocess for b in backbones}, writer.done)
    plan = (list(range(s, min(s + batch_size, len(paths))))
            for s in range(0, len(paths), batch_size))
    total = writer.done + len(paths)
    bar = progress_bar(total=total, initial=writer.done, desc="cache", unit="img",
                       disable=not progress)
    t0 = time.perf_counter()
    done, forward_s = 0, 0.0
    for items in decoded_batches(dataset, plan, workers):
        ok = [(i, px) for i, px, _ in items if px is not None]
        skipped = {i: reason for i, _, reason in items if reason is not None}
        for i, reason in skipped.items():
            log.warning("skipping %s: %s", writer.manifest["images"][i]["path"], reason)
        acts = {b.name: torch.zeros(len(items), *_shape(b, target, keep_cls)) for b in backbones}
        if ok:
            pixels = batch_pixels(items, backbones)
            tf = time.perf_counter()
            got = extract_batch(backbones, pixels, target, keep_cls)
            forward_s += time.perf_counter() - tf
            rows = torch.tensor([i - items[0][0] for i, _ in ok])
            for name, a in got.items():
                acts[name][rows] = a
        writer.commit(items[0][0], acts, skipped)
        done += len(items)
        bar.update(len(items))
        bar.set_postfix(img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}",
                        skipped=len(writer.skipped), refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": done / max(seconds, 1e-9),
            "forward_seconds": forward_s}


def _shape(b: Backbone, target: tuple[int, int], keep_cls: bool) -> tuple[int, int]:
    return (target[0] * target[1] + (1 if keep_cls else 0), b.d)
