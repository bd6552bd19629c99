"""``usae explore``: a static concept explorer that works from ``file://``.

Layout of ``DIR``::

    index.html, app.js, text.js,       the app (copied from the package; text.js holds the
    style.css                          words it shows, by place)
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

from usae.analysis.eval_folder import (
    TOP_IMAGES_FILE,
    EvalReport,
    check_eval_of_run,
    read_concepts,
)
from usae.analysis.evaluate import evaluate
from usae.data.images import load_rgb
from usae.errors import UsaeError
from usae.files import json_text, load_safetensors, replace_folder
from usae.hub import local_run
from usae.options import EvalOptions, ExploreOptions, merged
from usae.progress import bar as progress_bar
from usae.sae.model import UniversalSAE
from usae.store.store import Store

log = logging.getLogger(__name__)
CHUNK = 64
THUMB = 128
STATIC = Path(__file__).with_name("static")


def _js(path: Path, call: str, obj: Any, assign: bool = False) -> int:
    """A data file as JavaScript: ``call(obj);`` or, with ``assign``, ``window.call = obj;``."""
    body = json_text(obj, separators=(",", ":"))
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
                   eval_dir: str | Path | None = None, options: ExploreOptions | None = None,
                   *, progress: bool = True, force: bool = False, **changes: Any) -> Path:
    """Write the explorer for a run and store into ``out``; returns ``out/index.html``.

    ``options`` (or keyword ``changes`` such as ``top=5``): see ``ExploreOptions``. Without
    ``eval_dir`` the run is evaluated first (into ``out/eval``). The folder is written whole
    or not at all; a non-empty folder that is not an explorer is refused unless ``force``.
    """
    o = merged(ExploreOptions, options, changes)
    run, out = local_run(run), Path(out)
    store = Store(store_path)
    sae = UniversalSAE.load(run)
    with replace_folder(out, "index.html", force, what="explorer") as tmp:
        report, concepts, top_images = _eval_inputs(run, store_path, sae, eval_dir, tmp, o,
                                                    progress)
        union, thumbs = _write_site(tmp, run, store, sae, top_images, o, progress)
        for png in Path(eval_dir if eval_dir is not None else tmp / "eval").glob("*.png"):
            shutil.copy(png, tmp / "plots" / png.name)
        _write_overview(tmp, run, store, sae, report, concepts, union, thumbs, o)
    log.info("explorer: %d concepts -> %s", sae.cfg.n, out / "index.html")
    return out / "index.html"


def _eval_inputs(run: Path, store_path: str | Path, sae: UniversalSAE,
                 eval_dir: str | Path | None, tmp: Path, o: ExploreOptions, progress: bool
                 ) -> tuple[EvalReport, list[dict[str, str]], dict[str, torch.Tensor]]:
    """The eval's report and concepts, and top images ranked on ``o.split``."""
    ranks = EvalOptions(split=o.split, top_images=max(o.top, 16))
    if eval_dir is None:
        eval_dir = tmp / "eval"
        evaluate(run, store_path, eval_dir, ranks, progress=progress)
    eval_dir = Path(eval_dir)
    report = check_eval_of_run(eval_dir, run, list(sae.models), sae.cfg.n)
    concepts = read_concepts(eval_dir)
    if report.split == o.split:
        return report, concepts, load_safetensors(eval_dir / "top_images.safetensors")
    # metrics stay those of the given eval (e.g. held-out); top images come from `split`,
    # ranked by an eval of that split kept in the site (OUT/eval-<split>/)
    ranked = tmp / f"eval-{o.split}"
    log.info("the eval is of split %r: ranking the top images on split %r into %s",
             report.split, o.split, ranked.name)
    evaluate(run, store_path, ranked, merged(EvalOptions, ranks, {"plots": False,
                                                                  "faithfulness": False}),
             progress=progress)
    top_images = load_safetensors(ranked / TOP_IMAGES_FILE)
    return report.with_changes(top_images_split=o.split), concepts, top_images


def _write_site(out: Path, run: Path, store: Store, sae: UniversalSAE,
                top_images: dict[str, torch.Tensor], o: ExploreOptions, progress: bool
                ) -> tuple[list[int], dict[int, str]]:
    """The app, thumbnails and the lazily loaded concept chunks; returns the rows shown and
    their thumbnails."""
    models = list(sae.models)
    for sub in ("data", "thumbs", "plots"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for f in STATIC.iterdir():
        shutil.copy(f, out / f.name)
    rankings = [_rankings(top_images, ["mean", *models], k, o.top) for k in range(sae.cfg.n)]
    union = _union(rankings)
    thumbs = _thumbnails(out, store, union, progress)
    by_concept = _codes_by_concept(sae, store, union)
    pos = {r: i for i, r in enumerate(union)}
    for c0 in range(0, sae.cfg.n, CHUNK):
        chunk = {k: _concept_entry(out, run, models, store.tokens, rankings[k], by_concept, pos,
                                   k) for k in range(c0, min(c0 + CHUNK, sae.cfg.n))}
        _js(out / "data" / f"concepts_{c0 // CHUNK}.js", "USAE_CHUNK",
            {"chunk": c0 // CHUNK, "concepts": chunk})
    return union, thumbs


def _union(rankings: list[dict[str, list[int]]]) -> list[int]:
    return sorted({r for rk in rankings for rows in rk.values() for r in rows})


def _thumbnails(out: Path, store: Store, union: list[int], progress: bool) -> dict[int, str]:
    images = store.manifest["images"]
    first = store.model(store.models[0]).info
    crop = first.get("preprocess", {}).get("crop", [1, 1])
    crop_frac = (1.0, float(crop[1]) / float(crop[0])) if crop[0] >= crop[1] else \
        (float(crop[0]) / float(crop[1]), 1.0)
    bar = progress_bar(total=len(union), desc="thumbnails", unit="img", disable=not progress)
    thumbs = {}
    for r in union:
        if _thumbnail(images[r]["path"], out / "thumbs" / f"{r}.jpg", crop_frac):
            thumbs[r] = f"thumbs/{r}.jpg"
        bar.update(1)
    bar.close()
    return thumbs


def _codes_by_concept(sae: UniversalSAE, store: Store, union: list[int]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per model, the COO codes of the shown images sorted by concept, and the bounds."""
    coo = _token_codes(sae, store, np.asarray(union, dtype=np.int64)) if union else {}
    by_concept = {}
    for m in sae.models:
        a = coo.get(m, np.zeros((0, 4)))
        a = a[np.argsort(a[:, 2], kind="stable")]
        by_concept[m] = (a, np.searchsorted(a[:, 2], np.arange(sae.cfg.n + 1)))
    return by_concept


def _concept_entry(out: Path, run: Path, models: list[str], tokens: int,
                   rankings: dict[str, list[int]],
                   by_concept: dict[str, tuple[np.ndarray, np.ndarray]], pos: dict[int, int],
                   k: int) -> dict[str, Any]:
    """Concept k's page data: image lists, uint8 token maps on one scale, CAM images."""
    imgs = sorted({r for rows in rankings.values() for r in rows})
    maps = np.zeros((len(models), len(imgs), tokens), np.float64)
    lut = np.full(len(pos), -1, dtype=np.int64)
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
    entry: dict[str, Any] = {"images": imgs, "rankings": rankings, "scale": scale,
                             "maps": {m: base64.b64encode(q[j].tobytes()).decode()
                                      for j, m in enumerate(models)}}
    entry.update(_cam_entry(out, run / "cam" / str(k), models, k))
    return entry


def _cam_entry(out: Path, cam_dir: Path, models: list[str], k: int) -> dict[str, Any]:
    """Copies concept k's CAM images and alpha maps (when present) and returns their page
    data, with the checks of its ``cam.json``."""
    cams = {m: f"cam/{k}/{m}.png" for m in models if (cam_dir / f"{m}.png").exists()}
    if not cams:
        return {}
    (out / "cam" / str(k)).mkdir(parents=True, exist_ok=True)
    alphas = {}
    for m, rel in cams.items():
        shutil.copy(cam_dir / f"{m}.png", out / rel)
        if (cam_dir / f"{m}_alpha.png").exists():
            alphas[m] = f"cam/{k}/{m}_alpha.png"
            shutil.copy(cam_dir / f"{m}_alpha.png", out / alphas[m])
    entry: dict[str, Any] = {"cam": cams, "cam_alpha": alphas}
    if (cam_dir / "cam.json").exists():
        doc = json.loads((cam_dir / "cam.json").read_text())
        entry["cam_checks"] = {key: doc.get(key) for key in (
            "self_ratio", "transfer", "transfer_control", "transfer_offdiag_mean",
            "transfer_control_offdiag_mean", "control_concept")}
    return entry


def _write_overview(out: Path, run: Path, store: Store, sae: UniversalSAE,
                    report: EvalReport, concepts: list[dict[str, str]], union: list[int],
                    thumbs: dict[int, str], o: ExploreOptions) -> None:
    models = list(sae.models)
    images = store.manifest["images"]

    def col(name: str, cast=float) -> list:
        return [None if c[name] == "" else cast(c[name]) for c in concepts]

    # the run's name only: a shared site must not show the building machine's paths
    shown = report.with_changes(run={k: v for k, v in (report.run or {}).items()
                                     if k != "path"}).to_json()
    overview = {
        "run": run.resolve().name, "models": models, "report": shown,
        "grid": store.grid(), "chunk": CHUNK, "n_concepts": sae.cfg.n, "top": o.top,
        "plots": sorted(p.name for p in (out / "plots").glob("*.png")),
        "table": {"energy": col("energy"), "firing_entropy": col("firing_entropy"),
                  "cofires": col("cofires", int), "class": [c["class"] for c in concepts],
                  **{f"fires_{m}": col(f"fires_{m}", int) for m in models},
                  **{f"cfp_{m}": col(f"cofire_proportion_{m}") for m in models}},
        "images": {str(r): {"name": Path(images[r]["path"]).name, "label": images[r].get("label"),
                            "thumb": thumbs.get(r)} for r in union},
    }
    _js(out / "data" / "overview.js", "USAE_OVERVIEW", overview, assign=True)
