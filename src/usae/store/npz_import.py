"""Import the reference implementation's cache: one ``.npz`` per image (``usae store
import-npz``).

Files are ``<image>_combined.npz`` (one array per model name) or ``<image>_<NAME>.npz``
(array ``activation``), anywhere under the source folder. Arrays are (tokens, d); prefix
tokens (tokens - floor(sqrt(tokens))²) are dropped and grids resampled to the smallest.
``np.load(allow_pickle=False)``: nothing is unpickled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usae.data.align import common_grid, resample_tokens, square_grid
from usae.data.splits import assign_splits
from usae.errors import UsaeError
from usae.progress import bar as progress_bar
from usae.store.store import ModelEntry
from usae.store.writer import StoreWriter


def find_npz(src: Path, models: list[str]) -> dict[str, dict[str, tuple[Path, str]]]:
    """image key -> model -> (file, array name)."""
    if not src.is_dir():
        raise UsaeError(f"{src} is not a folder")
    found: dict[str, dict[str, tuple[Path, str]]] = {}
    suffixes = sorted(models, key=len, reverse=True)
    for path in sorted(src.rglob("*.npz")):
        rel = path.relative_to(src).as_posix()[:-4]
        if rel.endswith("_combined"):
            key = rel[:-len("_combined")]
            for m in models:
                found.setdefault(key, {})[m] = (path, m)
            continue
        for m in suffixes:
            if rel.endswith("_" + m):
                found.setdefault(rel[:-len(m) - 1], {})[m] = (path, "activation")
                break
    if not found:
        raise UsaeError(f"no <image>_combined.npz or <image>_<NAME>.npz files under {src}")
    return found


def _load(path: Path, array: str, model: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if array not in z.files:
                raise UsaeError(f"{path}: no array {array!r} for model {model!r} "
                                f"(it has {z.files})")
            a = z[array]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UsaeError(f"{path}: cannot read ({err})") from None
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise UsaeError(f"{path}: model {model!r} array has shape {a.shape}, expected (tokens, d)")
    return a


def import_npz(src: str | Path, out: str | Path, models: list[str], split: str | None = None,
               dtype: str = "float16", batch: int = 64, seed: int = 0,
               progress: bool = True) -> dict[str, Any]:
    src = Path(src)
    found = find_npz(src, models)
    keys = sorted(found)
    incomplete = [(k, sorted(set(models) - set(found[k]))) for k in keys
                  if set(models) - set(found[k])]
    if incomplete:
        shown = "; ".join(f"{k}: missing {miss}" for k, miss in incomplete[:5])
        raise UsaeError(f"{len(incomplete)} image(s) lack some models ({shown})")
    first = {m: _load(*found[keys[0]][m], m) for m in models}
    layout = {}
    for m, a in first.items():
        prefix, grid = square_grid(a.shape[0])
        layout[m] = (prefix, grid, a.shape[0], a.shape[1])
    target = common_grid({m: v[1] for m, v in layout.items()})
    entries = [ModelEntry(m, layout[m][3], target[0] * target[1],
                          {"spec": f"npz:{m}", "grid": list(layout[m][1]), "aligned_grid":
                           list(target), "prefix_tokens": layout[m][0], "layer": "unknown",
                           "source": "reference npz"}) for m in models]
    images = [{"path": k, "label": None} for k in keys]
    assign_splits(images, [split] * len(images) if split else [None] * len(images), seed)
    writer = StoreWriter(out, entries, images, dtype, extra={"source": str(src.resolve())})
    bar = progress_bar(total=len(keys), initial=writer.done, desc="import-npz", unit="img",
                       disable=not progress)
    for start in range(writer.done, len(keys), batch):
        chunk = keys[start:start + batch]
        acts = {}
        for m in models:
            prefix, grid, tokens, d = layout[m]
            arrs = []
            for k in chunk:
                a = _load(*found[k][m], m)
                if a.shape != (tokens, d):
                    raise UsaeError(f"{found[k][m][0]}: model {m!r} has shape {a.shape} but "
                                    f"the first image has {(tokens, d)}")
                arrs.append(a)
            x = torch.from_numpy(np.stack(arrs).astype(np.float32))
            acts[m] = resample_tokens(x[:, prefix:], grid, target)
        writer.commit(start, acts, {})
        bar.update(len(chunk))
    bar.close()
    return writer.finalize()
