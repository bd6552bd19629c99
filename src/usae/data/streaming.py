"""Training that streams from the backbones: ``usae train --images SRC --models SPEC,...``.

For datasets whose activations do not fit on disk. ``StreamSource`` is a ``DataSource`` that
computes each batch through the cache path (decode and preprocess in threads, every
backbone, token alignment) instead of reading a store. Its image order is the store's
(``sources.chunked_order``: chunks shuffled, then a shuffle buffer of ``buffer_images``), a
pure function of (seed, epoch), so a resumed run sees exactly the images it would have seen,
and a run streamed from a folder equals one trained on the store cached from that folder.
Standardization statistics come from a first pass over a seeded sample of
``stats_images`` images; they are saved in the run (the SAE's standardization buffers).
Under ``torchrun`` each rank runs the backbones on its own slice of every batch, and the
sample's sums are added over the ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from usae.data.backbones import build_backbones, expand_specs
from usae.data.backbones.base import Backbone
from usae.data.cache import extract_batch
from usae.data.image_decoding import ImageDataset, batch_pixels, decoded_batches
from usae.data.images import list_images
from usae.data.sources import chunked_order, epoch_permutation, shard_slice
from usae.distributed import Dist, shard_range
from usae.errors import UsaeError
from usae.options import StreamOptions, merged
from usae.progress import bar as progress_bar
from usae.sae.training import resolve_run_config, train_run
from usae.store.stats import ModelStats, StatsAccumulator

log = logging.getLogger(__name__)
CHUNK_IMAGES = 64  # as StoreSource's default, so both give the same order


class StreamSource:
    """Aligned activations of ``entries`` (one split's images), computed batch by batch.

    ``stats_from``: the image paths the statistics sample is drawn from (default: these; the
    CLI passes every listed image, as a store's statistics cover all its images)."""

    def __init__(self, backbones: list[Backbone], target: tuple[int, int],
                 entries: list[dict[str, Any]], *, keep_cls: bool = False,
                 workers: int = 0, buffer_images: int = StreamOptions.shuffle_buffer,
                 stats_images: int = StreamOptions.stats_images,
                 stats_from: list[str] | None = None, dist: Dist | None = None,
                 progress: bool = True) -> None:
        if not entries:
            raise UsaeError("no images to stream")
        self.backbones, self.target, self.keep_cls = backbones, target, keep_cls
        self.paths = [e["path"] for e in entries]
        self.models = tuple(b.name for b in backbones)
        self.dims = tuple(b.d for b in backbones)
        self.workers = workers
        self.buffer_chunks = max(1, buffer_images // CHUNK_IMAGES)
        self.stats_images = stats_images
        self.progress = progress
        self.dist = dist or Dist()
        self.stats_paths = stats_from or self.paths
        self._preprocess = {b.name: b.preprocess for b in backbones}
        self._stats: dict[str, ModelStats] | None = None

    def n_images(self) -> int:
        return len(self.paths)

    def tokens_per_image(self) -> int:
        return self.target[0] * self.target[1] + (1 if self.keep_cls else 0)

    def image_order(self, seed: int, epoch: int) -> np.ndarray:
        return chunked_order(len(self.paths), CHUNK_IMAGES, self.buffer_chunks, seed, epoch)

    def stats(self) -> dict[str, ModelStats]:
        """Statistics of a seeded sample of ``stats_images`` images (all when fewer), each
        rank extracting its share and the float64 sums added over ranks."""
        if self._stats is None:
            n = len(self.stats_paths)
            sample = np.sort(epoch_permutation(n, 0, 0, salt=3)[:min(self.stats_images, n)])
            lo, hi = shard_range(len(sample), self.dist.rank, self.dist.world)
            accs = {m: StatsAccumulator(d) for m, d in zip(self.models, self.dims)}
            batches = [sample[i:min(i + 32, hi)] for i in range(lo, hi, 32)]
            log.info("standardization statistics: %d images through the backbones first",
                     len(sample))
            bar = progress_bar(total=hi - lo, desc="statistics", unit="img",
                               disable=not (self.progress and self.dist.is_main))
            for plan, acts in zip(batches, self._extract(self.stats_paths, batches)):
                for m, a in acts.items():
                    accs[m].update(a.numpy())
                bar.update(len(plan))
            bar.close()
            for acc in accs.values():
                packed = torch.from_numpy(np.concatenate([[acc.count], acc.sum_d, acc.sumsq_d]))
                self.dist.all_sum_(packed)
                d = acc.sum_d.shape[0]
                acc.count = int(packed[0])
                acc.sum_d, acc.sumsq_d = packed[1:1 + d].numpy(), packed[1 + d:].numpy()
            self._stats = {m: acc.result() for m, acc in accs.items()}
        return self._stats

    def batches(self, batch_images: int, seed: int, epoch: int, start: int = 0,
                shuffle_pairing: bool = False, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[dict[str, Tensor]]:
        """``{model: (B·tokens, d)}`` float32, B this rank's images of each batch."""
        if shuffle_pairing:
            raise UsaeError("shuffle_pairing needs a store (usae cache, then train --store)")
        order = self.image_order(seed, epoch)
        part = shard_slice(batch_images, shard)
        plan = [order[b * batch_images:(b + 1) * batch_images][part]
                for b in range(start, len(order) // batch_images)]
        for acts in self._extract(self.paths, plan):
            yield {m: a.reshape(-1, a.shape[-1]) for m, a in acts.items()}

    def _extract(self, paths: list[str], plan: list[np.ndarray]
                 ) -> Iterator[dict[str, Tensor]]:
        """``{model: (B, tokens, d)}`` for each list of positions in ``paths``, decoded
        ahead in threads."""
        if not plan:
            return
        dataset = ImageDataset(paths, self._preprocess)
        for items in decoded_batches(dataset, (p.tolist() for p in plan), self.workers):
            bad = [(i, reason) for i, px, reason in items if px is None]
            if bad:
                i, reason = bad[0]
                raise UsaeError(f"cannot stream {paths[i]}: {reason} — remove it (or "
                                "cache the images with `usae cache`, which skips bad files), "
                                "then --resume")
            yield extract_batch(self.backbones, batch_pixels(items, self.backbones), self.target,
                                self.keep_cls)


def train_from_images(images: str | Path, models: str, out: str | Path,
                      options: StreamOptions | None = None, *, preset: str | None = None,
                      config_file: str | None = None, sets: list[str] | None = None,
                      keys: dict[str, Any] | None = None, max_steps: int | None = None,
                      device: str | None = None, resume: bool = False, force: bool = False,
                      split: str = "train", progress: bool = True,
                      pretrained: bool | None = None, **changes: Any) -> dict[str, Any]:
    """``usae train --images``: train on activations computed on the fly; returns the
    training summary. ``options`` (or keyword ``changes`` such as ``workers=0``): the image
    options, as ``usae cache`` has them (``StreamOptions``); the training keys as for
    ``train_from_store``. Under ``torchrun`` every process runs this with the same arguments."""
    o = merged(StreamOptions, options, changes)
    dist = Dist.from_env(device or "cpu")
    try:
        entries = list_images(images, val_fraction=o.val_fraction, seed=o.split_seed)
        backbones, target = build_backbones(expand_specs(models), pretrained=pretrained,
                                            align=o.align)
        cfg = resolve_run_config(tuple(b.name for b in backbones),
                                 tuple(b.d for b in backbones), out, preset, config_file, sets,
                                 max_steps, device, resume, keys)
        for b in backbones:
            b.to(dist.device(cfg.train.device))
        opts = {"workers": o.resolved_workers(cfg.train.device), "keep_cls": o.keep_cls,
                "buffer_images": o.shuffle_buffer, "stats_images": o.stats_images, "dist": dist,
                "stats_from": [e["path"] for e in entries], "progress": progress}
        train = [e for e in entries if e["split"] == split]
        if not train:
            raise UsaeError(f"no {split!r} images in {images}")
        source = StreamSource(backbones, target, train, **opts)
        held_out = [e for e in entries if e["split"] == "val"]
        val = StreamSource(backbones, target, held_out, **opts) \
            if cfg.train.eval_every and held_out and split != "val" else None
        record = {"split": split, "stream": {"source": Path(images).name, "images": len(train),
                             "stats_images": min(o.stats_images, len(entries)),
                             "models": {b.name: {**b.info(), "aligned_grid": list(target)}
                                        for b in backbones}}}
        return train_run(cfg, source, out, val_source=val, resume=resume, force=force,
                         progress=progress, dist=dist, extra=record)
    finally:
        dist.close()
