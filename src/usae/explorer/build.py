"""``usae explore``: a static concept explorer that works from ``file://``.

Layout of ``DIR``::

    index.html, app.js, style.css      the app (copied from the package)
    data/overview.js                   report, concept table (columnar), image list
    data/concepts_<c>.js               64 concepts per file, loaded lazily by <script> tags
    thumbs/<row>.jpg                   one 128 px thumbnail per image, shared by concepts
    plots/*.png                        the plots from ``usae eval``

Data files are JavaScript (``window.USAE_*(...)`` calls), not JSON, because browsers block
``fetch`` on ``file://``. Token maps are uint8, scaled per concept to its maximum over the
models and images shown, so one colour scale is shared by every row of a concept page.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usae.errors import UsaeError

log = logging.getLogger(__name__)
CHUNK = 64
THUMB = 128
STATIC = Path(__file__).with_name("static")


def _js(path: Path, call: str, obj: Any, assign: bool = False) -> int:
    """A data file as JavaScript: ``call(obj);`` or, with ``assign``, ``window.call = obj;``."""
    body = json.dumps(obj, separators=(",", ":"))
    text = f"window.{call} = {body};\n" if assign else f"{call}({body});\n"
    path.write_text(text)
    return len(text)


def _rankings(top_images: dict[str, torch.Tensor], keys: list[str], k: int, top: int
              ) -> dict[str, list[int]]:
    out = {}
    for key in keys:
        rows = top_images[f"rows.{key}"][k, :top]
        scores = top_images[f"scores.{key}"][k, :top]
        out[key] = [int(r) for r, s in zip(rows.tolist(), scores.tolist()) if r >= 0 and s > 0]
    return out


@torch.no_grad()
def _token_codes(sae, store, rows: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """Per model, COO arrays (image position, token, concept, value) for ``rows``."""
    out: dict[str, list[np.ndarray]] = {m: [] for m in sae.models}
    for start in range(0, len(rows), batch):
        r = rows[start:start + batch]
        for m in sae.models:
            x = store.read(m, r)
            b, t, d = x.shape
            enc = sae.encode_standardized(m, sae.standardize(m, x.reshape(-1, d)))
            vals, idx = enc.values_nk.numpy(), enc.indices_nk.numpy()
            tok = np.repeat(np.arange(b * t), vals.shape[1])
            keep = vals.reshape(-1) > 0
            img = tok // t + start
            out[m].append(np.stack([img[keep], (tok % t)[keep], idx.reshape(-1)[keep],
                                    vals.reshape(-1)[keep].astype(np.float64)], axis=1))
    return {m: (np.concatenate(v) if v else np.zeros((0, 4))) for m, v in out.items()}


def _thumbnail(src: str, dst: Path, crop_frac: tuple[float, float]) -> bool:
    """The centre region the models saw, as a THUMB px square JPEG; False when unreadable."""
    from usae.images import load_rgb

    try:
        img = load_rgb(src)
    except (UsaeError, OSError):
        return False
    w, h = img.size
    side = min(w, h)
    cw, ch = side * crop_frac[1], side * crop_frac[0]
    left, top = (w - cw) / 2, (h - ch) / 2
    img = img.crop((round(left), round(top), round(left + cw), round(top + ch)))
    img = img.resize((THUMB, THUMB), 3)  # bicubic
    img.save(dst, quality=80)
    return True


def build_explorer(run: str | Path, store_path: str | Path, out: str | Path,
                   eval_dir: str | Path | None = None, top: int = 10, split: str = "all",
                   progress: bool = True) -> Path:
    """Write the explorer for a run and store into ``out``; returns ``out/index.html``."""
    from usae.evaluate import evaluate, read_concepts_csv
    from usae.io import load_safetensors
    from usae.progress import bar as progress_bar
    from usae.sae import UniversalSAE
    from usae.store import Store

    run, out = Path(run), Path(out)
    store = Store(store_path)
    sae = UniversalSAE.load(run)
    if eval_dir is None:
        eval_dir = out / "eval"
        evaluate(run, store_path, eval_dir, split=split, top=max(top, 16), progress=progress)
    eval_dir = Path(eval_dir)
    for name in ("report.json", "concepts.csv", "top_images.safetensors"):
        if not (eval_dir / name).exists():
            raise UsaeError(f"{eval_dir} lacks {name}; run `usae eval` first")
    report = json.loads((eval_dir / "report.json").read_text())
    if report["models"] != list(sae.models):
        raise UsaeError(f"{eval_dir} was computed for models {report['models']}, not "
                        f"{list(sae.models)}")
    concepts = read_concepts_csv(eval_dir / "concepts.csv")
    if report.get("split") != split:
        # metrics stay those of the given eval (e.g. held-out); top images come from `split`
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            evaluate(run, store_path, tmp, split=split, top=max(top, 16), plots=False,
                     progress=progress)
            top_images = load_safetensors(Path(tmp) / "top_images.safetensors")
        report["top_images_split"] = split
    else:
        top_images = load_safetensors(eval_dir / "top_images.safetensors")
    models = list(sae.models)
    keys = ["mean", *models]

    for sub in ("data", "thumbs", "plots"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for f in STATIC.iterdir():
        shutil.copy(f, out / f.name)
    for png in eval_dir.glob("*.png"):
        shutil.copy(png, out / "plots" / png.name)

    rankings = [_rankings(top_images, keys, k, top) for k in range(sae.cfg.n)]
    union = sorted({r for rk in rankings for rows in rk.values() for r in rows})
    pos = {r: i for i, r in enumerate(union)}
    coo = _token_codes(sae, store, np.asarray(union, dtype=np.int64)) if union else {}
    by_concept = {}
    for m in models:
        a = coo.get(m, np.zeros((0, 4)))
        order = np.argsort(a[:, 2], kind="stable")
        a = a[order]
        bounds = np.searchsorted(a[:, 2], np.arange(sae.cfg.n + 1))
        by_concept[m] = (a, bounds)

    images = store.manifest["images"]
    first = store.manifest["models"][models[0]]
    crop = first.get("preprocess", {}).get("crop", [1, 1])
    crop_frac = (1.0, float(crop[1]) / float(crop[0])) if crop[0] >= crop[1] else \
        (float(crop[0]) / float(crop[1]), 1.0)
    bar = progress_bar(total=len(union), desc="thumbnails", unit="img", disable=not progress)
    thumbs = {}
    for r in union:
        path = images[r]["path"]
        if _thumbnail(path, out / "thumbs" / f"{r}.jpg", crop_frac):
            thumbs[r] = f"thumbs/{r}.jpg"
        bar.update(1)
    bar.close()

    tokens = store.tokens
    grid = store.manifest["models"][models[0]].get("aligned_grid") or \
        [int(round(tokens ** 0.5))] * 2
    cam_dir = run / "cam"
    for c0 in range(0, sae.cfg.n, CHUNK):
        chunk = {}
        for k in range(c0, min(c0 + CHUNK, sae.cfg.n)):
            imgs = sorted({r for rows in rankings[k].values() for r in rows})
            maps = np.zeros((len(models), len(imgs), tokens), np.float64)
            lut = np.full(len(union), -1, dtype=np.int64)
            lut[[pos[r] for r in imgs]] = np.arange(len(imgs))
            for j, m in enumerate(models):
                a, bounds = by_concept[m]
                seg = a[bounds[k]:bounds[k + 1]]
                where = lut[seg[:, 0].astype(np.int64)]
                ok = where >= 0
                maps[j, where[ok], seg[ok, 1].astype(np.int64)] = seg[ok, 3]
            scale = float(maps.max()) if maps.size else 0.0
            q = np.zeros_like(maps, dtype=np.uint8) if scale <= 0 else \
                np.round(maps / scale * 255).astype(np.uint8)
            entry: dict[str, Any] = {
                "images": imgs, "rankings": rankings[k], "scale": scale,
                "maps": {m: base64.b64encode(q[j].tobytes()).decode()
                         for j, m in enumerate(models)},
            }
            cams = {m: f"cam/{k}/{m}.png" for m in models
                    if (cam_dir / str(k) / f"{m}.png").exists()}
            if cams:
                for m, rel in cams.items():
                    dst = out / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(cam_dir / str(k) / f"{m}.png", dst)
                entry["cam"] = cams
            chunk[k] = entry
        _js(out / "data" / f"concepts_{c0 // CHUNK}.js", "USAE_CHUNK", {"chunk": c0 // CHUNK,
                                                                         "concepts": chunk})

    def col(name: str, cast=float) -> list:
        return [None if c[name] == "" else cast(c[name]) for c in concepts]

    overview = {
        "run": str(run.resolve()), "models": models, "report": report, "grid": grid,
        "chunk": CHUNK, "n_concepts": sae.cfg.n, "top": top,
        "plots": sorted(p.name for p in (out / "plots").glob("*.png")),
        "table": {"energy": col("energy"), "firing_entropy": col("firing_entropy"),
                  "cofires": col("cofires", int), "class": [c["class"] for c in concepts],
                  **{f"fires_{m}": col(f"fires_{m}", int) for m in models},
                  **{f"cfp_{m}": col(f"cofire_proportion_{m}") for m in models}},
        "images": {str(r): {"name": Path(images[r]["path"]).name, "label": images[r].get("label"),
                            "thumb": thumbs.get(r)} for r in union},
    }
    _js(out / "data" / "overview.js", "USAE_OVERVIEW", overview, assign=True)
    log.info("explorer: %d concepts, %d images -> %s", sae.cfg.n, len(union), out / "index.html")
    return out / "index.html"
