"""Loader throughput: our store against the reference layout (one ``_combined.npz`` per image
read by a torch DataLoader), at the paper's dims, in the same run. Prints one JSON line.

Both loaders yield batches of 32 images' tokens for every model. ``speedup`` compares with
the reference layout, compressed ``.npz`` (``np.savez_compressed``; timed on a subset of
files, since the rate is per file); ``speedup_vs_uncompressed_npz`` compares with the same
files written uncompressed for every image (a faster baseline than the reference's). Warm:
every file read once before timing. Cold: pages evicted with ``posix_fadvise(DONTNEED)``.

    python benchmarks/store_read.py [--images 2000] [--dir /tmp/usae-bench]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from usae.data.sources import StoreSource
from usae.store.writer import store_from_arrays

MODELS = {"siglip": 768, "dinov2": 384, "vit": 768}
TOKENS, BATCH = 196, 32


class NpzDataset(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with np.load(self.files[i]) as z:
            return {m: torch.from_numpy(z[m]) for m in MODELS}


def collate(items):
    return {m: torch.cat([it[m] for it in items]) for m in MODELS}


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_tokens(batches) -> tuple[float, int]:
    t0, tokens = time.perf_counter(), 0
    for b in batches:
        tokens += b["siglip"].shape[0]
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dir", default="/tmp/usae-bench-store")
    ap.add_argument("--compressed", type=int, default=256,
                    help="images also written as compressed .npz (the reference's layout)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "npz").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = args.images
    # Activation-like data: a shared low-rank part plus noise, float32.
    arrays = {}
    for m, d in MODELS.items():
        a = np.empty((n, TOKENS, d), np.float32)
        for s in range(0, n, 250):
            blk = min(250, n - s)
            a[s:s + blk] = rng.standard_normal((blk, TOKENS, d), dtype=np.float32)
        arrays[m] = a
    files = []
    for i in range(n):
        path = root / "npz" / f"img{i:06d}_combined.npz"
        np.savez(path, **{m: arrays[m][i] for m in MODELS})
        files.append(str(path))
    store_from_arrays(root / "store", arrays, dtype="float16", splits=["train"] * n)
    npz_bytes = sum(os.path.getsize(f) for f in files)
    store_files = [str(p) for p in (root / "store").iterdir()]
    store_bytes = sum(os.path.getsize(f) for f in store_files)
    (root / "npz_compressed").mkdir()
    compressed = []
    for i in range(min(args.compressed, n)):
        path = root / "npz_compressed" / f"img{i:06d}_combined.npz"
        np.savez_compressed(path, **{m: arrays[m][i] for m in MODELS})
        compressed.append(str(path))
    compressed_estimate = sum(os.path.getsize(f) for f in compressed) / len(compressed) * n
    del arrays

    source = StoreSource(root / "store", "train")
    loader = torch.utils.data.DataLoader(NpzDataset(files), batch_size=BATCH, shuffle=True,
                                         num_workers=0, collate_fn=collate, drop_last=True)
    zloader = torch.utils.data.DataLoader(NpzDataset(compressed), batch_size=BATCH, shuffle=True,
                                          num_workers=0, collate_fn=collate, drop_last=True)
    # warm the page cache for all three, then time alternately
    timed_tokens(source.batches(BATCH, 0, 0))
    timed_tokens(loader)
    timed_tokens(zloader)
    ours, theirs, zipped = [], [], []
    for rep in range(2):
        t, tok = timed_tokens(source.batches(BATCH, 0, rep + 1))
        ours.append(tok / t)
        t, tok = timed_tokens(loader)
        theirs.append(tok / t)
        t, tok = timed_tokens(zloader)
        zipped.append(tok / t)
    del source  # unmap: mapped pages cannot be evicted
    gc.collect()
    evict(store_files)
    source = StoreSource(root / "store", "train")
    t, tok = timed_tokens(source.batches(BATCH, 0, 9))
    ours_cold = tok / t
    evict(compressed)
    t, tok = timed_tokens(zloader)
    zipped_cold = tok / t
    evict(files)
    t, tok = timed_tokens(loader)
    theirs_cold = tok / t
    result = {
        "benchmark": "store_read", "images": n, "tokens_per_image": TOKENS,
        "dims": list(MODELS.values()),
        "store_tokens_per_s": round(max(ours)), "npz_tokens_per_s": round(max(zipped)),
        "speedup": round(max(ours) / max(zipped), 2),
        "uncompressed_npz_tokens_per_s": round(max(theirs)),
        "speedup_vs_uncompressed_npz": round(max(ours) / max(theirs), 2),
        "cold_store_tokens_per_s": round(ours_cold), "cold_npz_tokens_per_s": round(zipped_cold),
        "cold_speedup": round(ours_cold / zipped_cold, 2),
        "cold_uncompressed_npz_tokens_per_s": round(theirs_cold),
        "cold_speedup_vs_uncompressed_npz": round(ours_cold / theirs_cold, 2),
        "store_bytes": store_bytes, "npz_float32_bytes": npz_bytes,
        "disk_ratio": round(store_bytes / npz_bytes, 4),
        "disk_ratio_vs_compressed_npz": round(store_bytes / compressed_estimate, 4),
        "store_dtype": "float16", "batch_images": BATCH,
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
