"""``usae cam``: coordinated activation maximization (MACO-style), offline, and measured.

For a concept k and each model m, an image is optimized so that concept k's encoder
pre-activation, averaged over tokens, is as high as possible in model m. The image is
parametrized by its Fourier *phase* under a fixed magnitude spectrum (MACO, Fel et al. 2023),
in a decorrelated colour space; only the phase is optimized (NAdam), under random crops and
small noise. The spectrum and the colour basis come from the user's own images (the store's
sources), not from a downloaded ImageNet spectrum (``usae.cam.spectrum``).

*Coordinated*: every model starts from the same seed and phase and uses the same spectrum,
augmentations and steps, so the M images differ only by what each model needs.

Objective: the mean over tokens of concept k's pre-activation (before ReLU and TopK; BatchNorm
in eval mode). The pre-activation is smooth where TopK is not, so gradients exist from the
first step even when the concept is not yet in the top k; it is the quantity whose ranking
TopK reads, so raising it is what makes the concept fire.

The checks (``cam.json``) are robust scores, defined for every concept: a value v of concept
k in model m becomes (v - median) / scale, with the median and the 99th percentile of k's
token-mean pre-activation over the store's natural images, and scale = q99 - median, floored
at a tenth of the model's median spread (so a weak or rare concept gets a finite,
comparable score). 0 is a typical natural image; 1 is the natural top 1 %.
``self_ratio[m]``: the score of model m's saved 8-bit PNG in model m; ``transfer[m][j]``:
model m's image scored in model j; ``transfer_control``: the same matrix for a control
concept matched in firing frequency (the chosen concepts' median rate).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from usae.analysis.eval_folder import CONCEPTS_FILE, REPORT_FILE, TOP_IMAGES_FILE, check_eval_of_run
from usae.cam.select import pick_concepts
from usae.cam.spectrum import Spectrum, load_or_estimate_spectrum
from usae.data.align import align_tokens
from usae.data.backbones import rebuild_cached
from usae.data.backbones.base import Backbone
from usae.data.images import load_rgb, preprocess_image
from usae.errors import UsaeError
from usae.files import atomic_write_json, atomic_write_with, load_safetensors
from usae.hub import is_hub_run, local_run
from usae.malloc import keep_freed_memory
from usae.options import CamOptions, merged
from usae.progress import bar as progress_bar
from usae.sae import run as run_folder
from usae.sae.model import UniversalSAE
from usae.store.store import Store

log = logging.getLogger(__name__)
RANKING_EVAL = "ranking-eval"  # OUT/ranking-eval: the eval --top ranks by when none is given


class CamModel:
    """Pixels in [0, 1] (B, 3, S, S) -> concept pre-activations (B, n) of one model, through
    exactly the cache's path: the model's input size and normalization, its layer, the
    store's token alignment, the run's standardization and encoder."""

    def __init__(self, backbone: Backbone, sae: UniversalSAE, target: tuple[int, int],
                 keep_cls: bool) -> None:
        self.b, self.sae, self.target, self.keep_cls = backbone, sae, target, keep_cls
        p = backbone.preprocess
        self.crop = p.crop
        self.mean = torch.tensor(p.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(p.std).view(1, 3, 1, 1)

    def to(self, device: torch.device) -> "CamModel":
        self.b.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def pre_activations(self, x01_bchw: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] at the model's input size -> (B, n), token-averaged."""
        px = (x01_bchw - self.mean) / self.std
        acts = align_tokens(self.b.forward(px), self.b.n_prefix, self.b.grid, self.target,
                            self.keep_cls)
        bsz, t, d = acts.shape
        m = self.b.name
        pre = self.sae.pre_activations(m, self.sae.standardize(m, acts.reshape(bsz * t, d)))
        return pre.reshape(bsz, t, -1).mean(1)

    def natural(self, img: Image.Image) -> Tensor:
        """An image through the cache's own preprocessing (PIL resize and crop) -> (n,)."""
        px = preprocess_image(img, self.b.preprocess)[None].to(self.mean.device)
        with torch.no_grad():
            return self.pre_activations(px * self.std + self.mean)[0]


def build_cam_models(sae: UniversalSAE, store: Store, device: torch.device
                     ) -> dict[str, CamModel]:
    """One ``CamModel`` per model, built from the store's manifest (spec, layer, grid)."""
    out = {}
    for m in sae.models:
        info = store.model(m).as_manifest()
        backbone = rebuild_cached(m, info)
        for p in backbone.module.parameters():
            p.requires_grad_(False)
        out[m] = CamModel(backbone, sae, tuple(info["aligned_grid"]), bool(info.get("keep_cls")))
        out[m].to(device)
    return out


def check_run_and_store(sae: UniversalSAE, run: Path, store: Store) -> None:
    """The checks of ``usae eval``, and a backbone spec to rebuild each model from."""
    run_folder.check_run_matches_store(run, sae.models, sae.cfg.dims, store)
    for m in sae.models:
        if "spec" not in store.model(m).info or \
                str(store.model(m).info["spec"]).startswith("array:"):
            raise UsaeError(f"model {m!r} of {store.path} has no backbone spec (an imported or "
                            "in-memory store); CAM needs a store made by `usae cache`")


# ---- the optimization ---------------------------------------------------------------------
def random_crops(x_bchw: Tensor, n: int, out_hw: tuple[int, int], gen: torch.Generator,
                 noise: float) -> Tensor:
    """``n`` square crops of 25-100 % of the area, resized (antialiased) to ``out_hw``, plus
    Gaussian noise: (n, 3, *out_hw)."""
    size = x_bchw.shape[-1]
    crops = []
    for _ in range(n):
        side = int(size * math.sqrt(0.25 + 0.75 * float(torch.rand((), generator=gen))))
        side = max(8, min(size, side))
        y0 = int(torch.randint(0, size - side + 1, (), generator=gen))
        x0 = int(torch.randint(0, size - side + 1, (), generator=gen))
        crop = x_bchw[:, :, y0:y0 + side, x0:x0 + side]
        crops.append(F.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False,
                                   antialias=True))
    batch = torch.cat(crops)
    eps = torch.randn(batch.shape, generator=gen).to(batch.device) * noise
    return (batch + eps).clamp(0, 1)


def optimize(model: CamModel, concept: int, spectrum: Spectrum, o: CamOptions,
             desc: str = "cam", progress: bool = True) -> dict[str, Any]:
    """Optimize the phase for one (concept, model). Returns the image (3, S, S) in [0, 1],
    the accumulated |gradient| map (S, S) and the objective trace."""
    device = model.mean.device
    gen = torch.Generator().manual_seed(o.seed)  # the same start for every model
    phase = spectrum.random_phase(gen).to(device).requires_grad_(True)
    opt = torch.optim.NAdam([phase], lr=o.lr)
    alpha = torch.zeros(spectrum.size, spectrum.size, device=device)  # the image's size
    trace = []
    bar = progress_bar(total=o.steps, desc=desc, unit="step", disable=not progress, leave=False)
    for step in range(o.steps):
        image = spectrum.image(phase)  # (1, 3, S, S) in [0, 1]
        image.retain_grad()
        batch = random_crops(image, o.crops, model.crop, gen, o.noise)
        objective = model.pre_activations(batch)[:, concept].mean()
        opt.zero_grad(set_to_none=True)
        (-objective).backward()
        opt.step()
        alpha += image.grad[0].abs().sum(0)
        if step % 10 == 0 or step == o.steps - 1:
            trace.append([step, round(float(objective.detach()), 6)])
        bar.update(1)
    bar.close()
    with torch.no_grad():
        final = spectrum.image(phase)[0].cpu()
    return {"image": final, "alpha": alpha.cpu(), "trace": trace}


# ---- measurements -------------------------------------------------------------------------
FLOOR_FRACTION = 0.1  # a concept's scale is at least this share of its model's typical scale
FLOOR_SAMPLE = 1024  # concepts whose spreads give the model's typical scale (all, if fewer)


def natural_scales(sae: UniversalSAE, store: Store, concepts: list[int],
                   max_images: int = 4096) -> dict[str, dict[int, dict[str, float]]]:
    """Per model and concept, the robust scale of the token-mean pre-activation over natural
    images (the store's activations, exactly what the models produced): its ``median``, its
    ``q99`` and ``scale = max(q99 - median, floor)``, where ``floor`` is FLOOR_FRACTION of the
    median of ``q99 - median`` over the model's concepts (a seeded sample of FLOOR_SAMPLE when
    there are more: memory stays (images, |concepts| + FLOOR_SAMPLE) at any n). The floor keeps
    the score finite and comparable for a weak or rare concept, whose own spread is near 0."""
    rows = store.rows("all")[:max_images]
    n = sae.cfg.n
    sample = torch.arange(n) if n <= FLOOR_SAMPLE else \
        torch.randperm(n, generator=torch.Generator().manual_seed(0))[:FLOOR_SAMPLE]
    cols = torch.cat([torch.tensor(concepts, dtype=torch.long), sample])
    out: dict[str, dict[int, dict[str, float]]] = {m: {} for m in sae.models}
    with torch.no_grad():
        for m in sae.models:
            means = []
            for start in range(0, len(rows), 64):
                x = store.read(m, rows[start:start + 64]).to(sae.device_of())
                bsz, t, d = x.shape
                pre = sae.pre_activations(m, sae.standardize(m, x.reshape(bsz * t, d)))
                means.append(pre.reshape(bsz, t, -1).mean(1)[:, cols.to(pre.device)].cpu())
            vals = torch.cat(means).double()  # (images, |concepts| + |sample|)
            median, q99 = vals.quantile(0.5, dim=0), vals.quantile(0.99, dim=0)
            spread = q99 - median
            floor = max(FLOOR_FRACTION * float(spread[len(concepts):].median()), 1e-6)
            for i, k in enumerate(concepts):
                out[m][k] = {"median": round(float(median[i]), 6), "q99": round(float(q99[i]), 6),
                             "scale": round(max(float(spread[i]), floor), 6),
                             "floored": bool(float(spread[i]) < floor)}
    return out


def robust_score(value: float, scale: dict[str, float]) -> float:
    """0 for a typical natural image (the median), 1 at the natural 99th percentile."""
    return (value - scale["median"]) / scale["scale"]


def firing_rates(sae: UniversalSAE, store: Store, images: int = 256) -> Tensor:
    """(n,) the fraction of tokens on which each concept fires, averaged over the models,
    on the store's first ``images`` images."""
    rows = store.rows("all")[:images]
    rate = torch.zeros(sae.cfg.n, dtype=torch.float64)
    with torch.no_grad():
        for j, m in enumerate(sae.models):
            x = store.read(m, rows).reshape(-1, store.dims[j])
            rate += (sae.encode(m, x) > 0).double().mean(0)
    return rate / len(sae.models)


def seen_by_every_model(models: dict[str, CamModel], pngs: dict[str, Path], concept: int
                        ) -> list[list[float]]:
    """Row m, column j: concept's activation in model j on model m's saved (8-bit) image."""
    images = {m: load_rgb(pngs[m]) for m in models}
    return [[float(models[j].natural(images[m])[concept]) for j in models] for m in models]


# ---- files --------------------------------------------------------------------------------
def save_png(path: Path, image_chw: Tensor) -> None:
    arr = (image_chw.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    atomic_write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_alpha(path: Path, alpha_hw: Tensor) -> None:
    a = alpha_hw / alpha_hw.max() if float(alpha_hw.max()) > 0 else alpha_hw
    arr = (a.numpy() * 255).round().astype(np.uint8)
    atomic_write_with(path, lambda tmp: Image.fromarray(arr, "L").save(tmp, format="PNG"))


def save_grid(path: Path, pngs: dict[str, Path], naturals: list[str], tile: int = 160) -> None:
    """Each model's CAM image, then the concept's top natural images, in one row."""
    items = [(m, Image.open(p).convert("RGB")) for m, p in pngs.items()]
    for p in naturals:
        try:
            items.append(("natural", load_rgb(p)))
        except UsaeError:
            continue
    canvas = Image.new("RGB", (tile * len(items), tile), (255, 255, 255))
    for i, (_, im) in enumerate(items):
        canvas.paste(im.resize((tile, tile), Image.BICUBIC), (i * tile, 0))
    atomic_write_with(path, lambda tmp: canvas.save(tmp, format="PNG"))


# ---- the command --------------------------------------------------------------------------
def run_cam(run: str | Path, store_path: str | Path, concepts: list[int] | None = None,
            top: int | None = None, out: str | Path | None = None,
            options: CamOptions | None = None, *, eval_dir: str | Path | None = None,
            progress: bool = True, **changes: Any) -> dict[int, dict[str, Any]]:
    """CAM for ``concepts`` (or the ``top`` most energetic universal concepts) into
    ``out/<k>/`` (default ``RUN/cam/<k>/``); returns each concept's ``cam.json``."""
    o = merged(CamOptions, options, changes)
    if out is None and is_hub_run(run):
        raise UsaeError(f"{run} is a Hub run, whose folder is the Hub's download cache — pass "
                        "--out DIR for the images")
    run = local_run(run)
    out = Path(out) if out is not None else run / "cam"
    store = Store(store_path)
    keep_freed_memory(o.device)  # backbone passes: no page faults on every activation
    sae = UniversalSAE.load(run, device=o.device).eval()
    check_run_and_store(sae, run, store)
    if eval_dir is not None:
        check_eval_of_run(eval_dir, run, list(sae.models), sae.cfg.n,
                          need=(REPORT_FILE, CONCEPTS_FILE))
    ks = pick_concepts(sae, run, store_path, concepts, top, eval_dir, progress,
                       ranking_dir=out / RANKING_EVAL)
    device = torch.device(o.device)
    spectrum = load_or_estimate_spectrum(store, out / "spectrum.safetensors", o.size,
                                         o.spectrum_images).to(device)
    models = build_cam_models(sae, store, device)
    rates = firing_rates(sae, store)
    control_k = matched_control(rates, ks, o.seed)
    scales = natural_scales(sae, store, sorted({*ks, control_k}))
    control = _cam_concept(models, control_k, spectrum, o, out / "control", scales, progress)
    top_rows = _top_rows(eval_dir)
    results = {}
    for k in ks:
        res = _cam_concept(models, k, spectrum, o, out / str(k), scales, progress)
        res["checks"]["transfer_control"] = control["checks"]["transfer"]
        res["checks"]["control_concept"] = control_k
        res["checks"]["firing_rate"] = round(float(rates[k]), 6)
        res["checks"]["control_firing_rate"] = round(float(rates[control_k]), 6)
        res["checks"].update(_summaries(res["checks"]))
        naturals = [] if top_rows is None else \
            [store.manifest["images"][r]["path"] for r in top_rows[k, :4].tolist() if r >= 0]
        save_grid(out / str(k) / "grid.png", {m: out / str(k) / f"{m}.png" for m in models},
                  naturals)
        doc = {"concept": k, "settings": o.to_json(), "spectrum": spectrum.source,
               "measure": MEASURE, **res["checks"], "trace": res["trace"]}
        atomic_write_json(out / str(k) / "cam.json", doc)
        results[k] = doc
    return results


MEASURE = ("robust score: (activation - natural median) / scale, where scale = natural 99th "
           "percentile - median, floored at 0.1 x the model's median spread; 0 = a typical "
           "natural image, 1 = the top 1 % of natural images")


def _cam_concept(models: dict[str, CamModel], k: int, spectrum: Spectrum, o: CamOptions,
                 folder: Path, scales: dict, progress: bool) -> dict[str, Any]:
    pngs, trace = {}, {}
    for m, model in models.items():
        res = optimize(model, k, spectrum, o, desc=f"cam {k} {m}", progress=progress)
        pngs[m] = folder / f"{m}.png"
        save_png(pngs[m], res["image"])
        save_alpha(folder / f"{m}_alpha.png", res["alpha"])
        trace[m] = res["trace"]
    seen = seen_by_every_model(models, pngs, k)
    names = list(models)
    self_ratio = {m: round(robust_score(seen[i][i], scales[m][k]), 4)
                  for i, m in enumerate(names)}
    transfer = [[round(robust_score(seen[i][j], scales[v][k]), 4) for j, v in enumerate(names)]
                for i in range(len(names))]
    return {"checks": {"self_ratio": self_ratio, "transfer": transfer,
                       "natural": {m: scales[m][k] for m in names}}, "trace": trace}


def _summaries(checks: dict[str, Any]) -> dict[str, Any]:
    """Mean off-diagonal transfer (null with one model: there is no other model)."""
    def off_mean(mat: list[list[float]]) -> float | None:
        a = np.asarray(mat, dtype=np.float64)
        mask = ~np.eye(len(a), dtype=bool)
        return round(float(a[mask].mean()), 4) if mask.any() else None

    return {"transfer_offdiag_mean": off_mean(checks["transfer"]),
            "transfer_control_offdiag_mean": off_mean(checks["transfer_control"])}


def matched_control(rates: Tensor, ks: list[int], seed: int, pool: int = 8) -> int:
    """A control concept matched in firing frequency: a seeded pick among the ``pool``
    concepts (not in ``ks``) whose firing rate is closest to the median rate of ``ks``,
    in log space (rates span orders of magnitude)."""
    target = float(torch.log(rates[ks].median().clamp_min(1e-9)))
    distance = (torch.log(rates.clamp_min(1e-9)) - target).abs()
    distance[ks] = float("inf")
    nearest = torch.argsort(distance, stable=True)[:pool].tolist()
    return int(nearest[int(np.random.default_rng([seed, 31337]).integers(len(nearest)))])


def _top_rows(eval_dir: str | Path | None) -> Tensor | None:
    """The eval's top images per concept (n, T) by mean activation, when there is an eval."""
    path = Path(eval_dir) / TOP_IMAGES_FILE if eval_dir else None
    return load_safetensors(path)["rows.mean"] if path is not None and path.exists() else None
