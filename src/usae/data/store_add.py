"""``usae store add-model``: a finished store gains models, for exactly its own images.

The new models' activations are extracted by the cache path (``cache.build_store``) for the
store's image list, in its order and splits, aligned to its token grid, into a staging store
``STORE/.add-<names>/`` that resumes like any cache. Then the join: each new ``acts_<m>.bin``
is renamed into the store, and the manifest, with the new model entries, their statistics,
a ``history`` record and the new content hash, replaces the old one atomically. Nothing of the
existing models' files changes. A run killed during the join finishes it when run again.

A new model must reach the store's grid: with ``align=resample`` its own grid may not be
smaller (the store's models would have to be resampled too); with ``resize_input`` it is
rebuilt at the input size that gives the store's grid.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from usae.data.backbones import build_backbone, expand_specs
from usae.data.backbones.base import Backbone
from usae.data.cache import build_store
from usae.distributed import Dist
from usae.errors import UsaeError
from usae.files import atomic_write_json
from usae.malloc import keep_freed_memory
from usae.options import CacheOptions, merged
from usae.store.store import MANIFEST, Store, acts_file, content_hash, read_manifest

log = logging.getLogger(__name__)
STAGING_PREFIX = ".add-"


def add_models(store_path: str | Path, models: str | list[str],
               options: CacheOptions | None = None, *, pretrained: bool | None = None,
               progress: bool = True, dist: Dist | None = None, **changes: Any
               ) -> dict[str, Any]:
    """Add ``models`` (specs) to the finished store at ``store_path``; returns its new
    manifest. ``options`` (or keyword ``changes``): the cache options that apply
    (``batch_size``, ``workers``, ``device``); the store's own dtype, alignment, CLS choice
    and split are kept."""
    o = merged(CacheOptions, options, changes)
    own = dist is None
    dist = dist or Dist.from_env(o.device)
    try:
        return _add(Path(store_path), expand_specs(models), o, pretrained,
                    progress and dist.is_main, dist)
    finally:
        if own:
            dist.close()


def _add(path: Path, specs: list[str], o: CacheOptions, pretrained: bool | None,
         progress: bool, dist: Dist) -> dict[str, Any]:
    manifest = read_manifest(path)
    if manifest.get("state") != "final":
        raise UsaeError(f"{path} is not a finished store — finish its `usae cache` first")
    pending = _pending_join(path)
    joined = [] if pending is None else \
        [m for m in read_manifest(pending)["models"] if m not in manifest["models"]]
    dist.barrier()  # every rank has seen the pending join before the main rank finishes it
    if pending is not None:  # a stop during an earlier join: finish it first
        if dist.is_main:
            _join(path, pending)
        dist.barrier()
        manifest = read_manifest(path)
    store = Store(path)
    keep_cls = bool(manifest["models"][store.models[0]].get("keep_cls"))
    o = merged(CacheOptions, o, {"dtype": manifest["dtype"], "keep_cls": keep_cls,
                                 "align": manifest.get("align", "resample"), "shard_dir": ""})
    keep_freed_memory(o.device)
    target = tuple(store.grid())
    backbones = _backbones_for_grid(specs, target, o.align, pretrained)
    names = [b.name for b in backbones]
    if joined and set(names) <= set(joined):  # this command's own join, finished now
        return manifest
    taken = [m for m in names if m in manifest["models"]]
    if taken or len(set(names)) != len(names):
        raise UsaeError(f"the store already has model(s) {taken or names} — give the new "
                        "model another name (SPEC?name=NEW)")
    entries = [{k: v for k, v in image.items() if k != "skipped"}
               for image in manifest["images"]]
    staging = path / (STAGING_PREFIX + "+".join(names))
    extra = {"source": manifest.get("source"), "align": o.align, "adding_to": path.name}
    build_store(staging, entries, backbones, target, o, extra, progress, None, dist)
    if dist.is_main:
        _join(path, staging)
    dist.barrier()  # every rank returns the manifest the join wrote
    return read_manifest(path)


def _backbones_for_grid(specs: list[str], target: tuple[int, ...], align: str,
                        pretrained: bool | None) -> list[Backbone]:
    """The new models, each giving the store's grid ``target`` (or a clear error)."""
    out = []
    for spec in specs:
        b = build_backbone(spec, pretrained)
        if b.grid != target and align == "resize_input":
            patch = b.preprocess.crop[0] // b.grid[0]
            b = build_backbone(spec, pretrained, img_size=target[0] * patch)
        if b.grid[0] < target[0] or b.grid[1] < target[1] or \
                (align == "resize_input" and b.grid != target):
            raise UsaeError(f"{b.name}: its token grid {list(b.grid)} cannot give the store's "
                            f"{list(target)} (grids are only resampled down, as in a cache of "
                            "every model at once) — cache all the models into a new store")
        out.append(b)
    return out


def _check_same_skips(manifest: dict[str, Any], staged: dict[str, Any], names: list[str],
                      staging: Path) -> None:
    """The new models must skip exactly the images the store skipped (same files)."""
    was = {i for i, e in enumerate(manifest["images"]) if e.get("skipped")}
    now = {i for i, e in enumerate(staged["images"]) if e.get("skipped")}
    if was != now:
        i = min(was ^ now)
        raise UsaeError(f"image {manifest['images'][i]['path']} was "
                        f"{'skipped' if i in was else 'read'} when the store was cached but "
                        f"is {'read' if i in was else 'skipped'} now — its file changed; "
                        f"models {names} cannot be added for the same images (remove "
                        f"{staging} to start again)")


def _pending_join(path: Path) -> Path | None:
    """A finished staging store whose models are not in the store's manifest yet."""
    for staging in sorted(path.glob(STAGING_PREFIX + "*")):
        if (staging / MANIFEST).exists() and read_manifest(staging).get("state") == "final":
            return staging
    return None


def _join(path: Path, staging: Path) -> dict[str, Any]:
    """Rename the staged arrays into the store, then replace its manifest (atomic)."""
    staged, manifest = read_manifest(staging), read_manifest(path)
    names = [m for m in staged["models"] if m not in manifest["models"]]
    if names:
        _check_same_skips(manifest, staged, names, staging)  # (before anything moves)
    for m in names:
        if acts_file(staging, m).exists():
            os.replace(acts_file(staging, m), acts_file(path, m))
    if names:
        previous = manifest["content_hash"]
        for m in names:
            manifest["models"][m] = staged["models"][m]
            manifest["stats"][m] = staged["stats"][m]
        manifest.setdefault("history", []).append(
            {"added": names, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "previous_content_hash": previous})
        manifest["content_hash"] = content_hash(path, manifest)
        atomic_write_json(path / MANIFEST, manifest)
        log.info("added %s to %s (%d images)", ", ".join(names), path, manifest["n_images"])
    shutil.rmtree(staging)
    return manifest
