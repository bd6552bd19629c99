"""Image sources and decoding: folder trees, list files, RGB conversion, bad-file handling.

A folder tree may have a ``train``/``val`` level (the split) and class subfolders (labels),
as in ImageNet. Order is deterministic (sorted paths). Without split folders a seeded 10%
is held out as ``val``. A file that cannot be decoded is skipped with its reason, never fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from usae.errors import UsaeError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_NAMES = {"train", "val", "validation", "test"}


def list_images(src: str | Path, val_fraction: float = 0.1, seed: int = 0) -> list[dict[str, Any]]:
    """``[{path, label, split}]`` for a folder tree or a text file of paths, sorted."""
    src = Path(src)
    if src.is_file():
        entries = _from_list_file(src)
    elif src.is_dir():
        entries = _from_folder(src)
    else:
        raise UsaeError(f"{src} does not exist")
    if not entries:
        raise UsaeError(f"no images under {src} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    assign_splits(entries, [e.pop("split", None) for e in entries], seed, val_fraction)
    return entries


def _from_folder(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        parts = path.relative_to(root).parts[:-1]
        split = None
        if parts and parts[0].lower() in SPLIT_NAMES:
            split = "val" if parts[0].lower() == "validation" else parts[0].lower()
            parts = parts[1:]
        out.append({"path": str(path.resolve()), "label": "/".join(parts) or None,
                    "split": split})
    return out


def _from_list_file(path: Path) -> list[dict[str, Any]]:
    """One image per line: ``path[,label[,split]]``; relative paths are from the list's folder."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        p = Path(parts[0]).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        out.append({"path": str(p.resolve()), "label": parts[1] if len(parts) > 1 else None,
                    "split": parts[2] if len(parts) > 2 and parts[2] else None})
    return out


def assign_splits(entries: list[dict[str, Any]], given: list[str | None], seed: int,
                  val_fraction: float = 0.1) -> None:
    """Use the given splits; when none are given, hold out a seeded ``val_fraction``."""
    if any(s is not None for s in given):
        for e, s in zip(entries, given):
            e["split"] = s or "train"
        return
    n = len(entries)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    val = set(np.random.default_rng([seed, 104729]).permutation(n)[:n_val].tolist())
    for i, e in enumerate(entries):
        e["split"] = "val" if i in val else "train"


def load_rgb(path: str | Path) -> "Image.Image":  # noqa: F821
    """Open any image as 8-bit RGB, EXIF orientation applied; raises ``UsaeError`` when the
    file is not a decodable image (the caller records the reason and skips it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UsaeError(f"{type(err).__name__}: {err}") from None
    except Image.DecompressionBombError as err:
        raise UsaeError(f"decompression bomb: {err}") from None
