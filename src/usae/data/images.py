"""Image sources and decoding: folder trees, list files, RGB conversion, bad-file handling.

A folder tree may have a ``train``/``val`` level (the split) and class subfolders (labels),
as in ImageNet. Order is deterministic (sorted paths). Without split folders a seeded 10%
is held out as ``val``. A file that cannot be decoded is skipped with its reason, never fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from usae.data.splits import SPLIT_NAMES, assign_splits
from usae.errors import UsaeError

if TYPE_CHECKING:
    from PIL import Image

    from usae.data.backbones.base import Preprocess

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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
        split = parts[2] if len(parts) > 2 and parts[2] else None
        if split is not None and split not in SPLIT_NAMES:
            raise UsaeError(f"{path}: unknown split {split!r} in line {raw.strip()!r} — use one "
                            f"of {sorted(SPLIT_NAMES)}")
        out.append({"path": str(p.resolve()), "label": parts[1] if len(parts) > 1 else None,
                    "split": "val" if split == "validation" else split})
    return out


def load_rgb(path: str | Path) -> "Image.Image":
    """Open any image as 8-bit RGB, EXIF orientation applied; raises ``UsaeError`` when the
    file is not a decodable image (the caller records the reason and skips it).

    High-bit-depth modes keep their content: 16-bit integers are divided by 257, 32-bit
    integers and floats are rescaled to 0-255 (by 255 for floats in [0, 1], else by their
    range), never clipped. Transparency is composited on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":
                return Image.fromarray(_to_uint8(np.asarray(im), im.mode)).convert("RGB")
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:  # (a colour key)
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UsaeError(f"{type(err).__name__}: {err}") from None
    except Image.DecompressionBombError as err:
        raise UsaeError(f"decompression bomb: {err}") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel high-bit-depth array as uint8, content preserved."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise UsaeError(f"mode {mode} image has NaN or infinite pixels")
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16"):
        scaled = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = a
    elif lo >= 0 and hi <= 65535 and mode == "I":
        scaled = a / 257.0  # 16-bit data opened as 32-bit integers (PNG, TIFF)
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---- transforms: the preprocessing every backbone declares --------------------------------
def preprocess_image(img: "Image.Image", p: "Preprocess") -> Tensor:
    """PIL RGB -> normalized (3, H, W): resize the short side (antialiased), center-crop."""
    return normalize(resize_crop(img, p), p)


def resize_crop(img: "Image.Image", p: "Preprocess") -> Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1]: short side to ``p.resize``, center crop."""
    return resize_crop_u8(img, p).float() / 255


def resize_crop_u8(img: "Image.Image", p: "Preprocess") -> Tensor:
    """PIL RGB -> (3, H, W) uint8: short side to ``p.resize``, center crop."""
    from PIL import Image

    modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}
    w, h = img.size
    ch, cw = p.crop
    scale = max(p.resize / min(w, h), ch / h, cw / w)
    new = (max(cw, round(w * scale)), max(ch, round(h * scale)))
    img = img.resize(new, modes.get(p.interpolation, Image.BICUBIC))  # PIL filters antialias
    left, top = (new[0] - cw) // 2, (new[1] - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(x: Tensor, p: "Preprocess") -> Tensor:
    return (x - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1)
