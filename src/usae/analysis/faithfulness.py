"""Faithfulness through each model's own computation: the vision analogue of "CE loss
recovered", for every pair of source and target model (``report.json``'s ``faithfulness``).

For an image and a target model B with a head, the cached layer's output is replaced while B
runs to its logits (``Backbone.logits``): the patch tokens by a reconstruction mapped from the
store's aligned grid back to B's native grid (bilinear, as the cache resampled it), the prefix
tokens (CLS, registers) kept from the original forward. Compared with B's unspliced output:

- ``top1_agreement[A][B]``: how often the top class is unchanged when the tokens are
  ``decode_B(encode_A(x_A))`` (A = B: self-reconstruction; otherwise A's code decoded into
  B's space);
- ``kl[A][B]``: the mean KL(p_original || p_spliced) over images;
- ``kl_recovered[A][B] = 1 - kl / kl_ablation[B]``, where the *mean ablation* replaces every
  patch token by the data's per-dimension mean (the store's statistics);
- ``resample_only[B]``: B's own tokens taken to the aligned grid and back, with no SAE: what
  the grid mapping alone costs (exactly nothing where the grids agree).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from usae.data.align import resample_tokens
from usae.data.backbones import rebuild_cached
from usae.data.backbones.base import Backbone
from usae.data.image_decoding import ImageDataset, batch_pixels
from usae.errors import UsaeError
from usae.progress import bar as progress_bar
from usae.sae.model import UniversalSAE
from usae.store.store import Store

log = logging.getLogger(__name__)
SPLICED = ("the cached layer's patch tokens, mapped from the aligned grid to the model's native "
           "grid (bilinear); prefix tokens from the original forward; then the rest of the "
           "model to its logits")


def kl_divergence(logits_ref: Tensor, logits_new: Tensor) -> Tensor:
    """(B,) KL(softmax(ref) || softmax(new)) in nats, in float64."""
    ref = torch.log_softmax(logits_ref.double(), dim=-1)
    new = torch.log_softmax(logits_new.double(), dim=-1)
    return (ref.exp() * (ref - new)).sum(-1)


def with_patches(tokens: Tensor, n_prefix: int, patches: Tensor) -> Tensor:
    """``tokens`` (B, prefix + h*w, d) with its patch tokens replaced by ``patches``."""
    return torch.cat([tokens[:, :n_prefix], patches.to(tokens.dtype)], dim=1)


class _Sums:
    """Running sums over images of agreement and KL, per (source, target)."""

    def __init__(self, m: int) -> None:
        self.agree, self.kl = np.zeros((m, m)), np.zeros((m, m))
        self.abl, self.res_agree, self.res_kl = np.zeros(m), np.zeros(m), np.zeros(m)
        self.n = np.zeros(m)


def heads(sae: UniversalSAE, store: Store) -> tuple[dict[str, Backbone], str | None]:
    """The models whose backbone can be rebuilt from the store and ends in a head; or why
    none can."""
    out, reasons = {}, []
    for m in sae.models:
        try:
            b = rebuild_cached(m, store.model(m).as_manifest())
        except UsaeError as err:
            reasons.append(str(err))
            continue
        if not b.has_head:
            reasons.append(f"{m}: {b.spec} has no classification head")
            continue
        out[m] = b
    return out, ("; ".join(reasons) or None) if not out else None


def measure(sae: UniversalSAE, store: Store, rows: np.ndarray, batch_images: int = 16,
            device: str = "cpu", max_images: int = 0, progress: bool = True
            ) -> dict[str, Any]:
    """The ``faithfulness`` section of ``report.json`` (``skipped`` with a reason when no
    model has a head or the images are gone). ``max_images``: 0 for every row."""
    models = list(sae.models)
    backbones, why = heads(sae, store)
    if not backbones:
        return {"skipped": why}
    rows = np.asarray(rows)[:max_images] if max_images else np.asarray(rows)
    paths = [store.manifest["images"][int(r)]["path"] for r in rows]
    if not all(Path(p).exists() for p in paths[:1]):
        return {"skipped": f"the store's images are not on this machine ({paths[0]})"}
    for b in backbones.values():
        b.to(device)
    sums = _Sums(len(models))
    means = {m: torch.from_numpy(np.asarray(store.stats()[m].mean_d)).float().to(device)
             for m in backbones}
    data = ImageDataset(paths, {b.name: b.preprocess for b in backbones.values()})
    bar = progress_bar(total=len(rows), desc="faithfulness", unit="img", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(rows), batch_images):
            items = [data[i] for i in range(start, min(start + batch_images, len(rows)))]
            ok = [i for i, px, _ in items if px is not None]
            if ok:
                _batch(sae, store, rows[ok], [it for it in items if it[1] is not None],
                       backbones, means, sums, device)
            bar.update(len(items))
    bar.close()
    return _section(models, backbones, sums)


def _batch(sae: UniversalSAE, store: Store, rows: np.ndarray, items: list, backbones:
           dict[str, Backbone], means: dict[str, Tensor], sums: _Sums, device: str) -> None:
    models = list(sae.models)
    info = store.manifest["models"]
    aligned = {m: store.read(m, rows).float().to(device) for m in models}
    codes = {a: sae.encode(a, x.reshape(-1, x.shape[-1])) for a, x in aligned.items()}
    pixels = batch_pixels(items, list(backbones.values()))
    for j, (tgt, b) in enumerate((m, backbones.get(m)) for m in models):
        if b is None:
            continue
        target = tuple(info[tgt]["aligned_grid"])
        keep_cls = 1 if info[tgt].get("keep_cls") else 0
        tokens, rest = b.splicer(pixels[b.name].to(device))
        orig = rest(tokens)

        def run(patches_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
            new = rest(with_patches(tokens, b.n_prefix, patches_fn(tokens)))
            return (new.argmax(-1) == orig.argmax(-1)).double(), kl_divergence(orig, new)

        def native(aligned_btd: Tensor) -> Tensor:
            return resample_tokens(aligned_btd[:, keep_cls:], target, b.grid)

        agree, kl = run(lambda tok: means[tgt].expand(tok.shape[0], b.grid[0] * b.grid[1], -1))
        sums.abl[j] += float(kl.sum())
        agree, kl = run(lambda tok: resample_tokens(resample_tokens(
            tok[:, b.n_prefix:], b.grid, target), target, b.grid))
        sums.res_agree[j] += float(agree.sum())
        sums.res_kl[j] += float(kl.sum())
        for i, src in enumerate(models):
            x_hat = sae.decode(tgt, codes[src]).reshape(aligned[tgt].shape).to(device)
            agree, kl = run(lambda tok, x_hat=x_hat: native(x_hat))
            sums.agree[i, j] += float(agree.sum())
            sums.kl[i, j] += float(kl.sum())
        sums.n[j] += len(rows)


def _section(models: list[str], backbones: dict[str, Backbone], s: _Sums) -> dict[str, Any]:
    def cell(value: float, j: int) -> float | None:
        return round(float(value / s.n[j]), 5) if models[j] in backbones and s.n[j] else None

    m = len(models)
    abl = [cell(s.abl[j], j) for j in range(m)]
    kl = [[cell(s.kl[i, j], j) for j in range(m)] for i in range(m)]

    def recovered(value: float | None, j: int) -> float | None:
        if value is None or not abl[j]:
            return None
        return round(1.0 - value / abl[j], 5)

    return {
        "models": models, "n_images": int(max(s.n, default=0)), "spliced": SPLICED,
        "heads": {name: (backbones[name].spec if name in backbones else None)
                  for name in models},
        "top1_agreement": [[cell(s.agree[i, j], j) for j in range(m)] for i in range(m)],
        "kl": kl,
        "kl_recovered": [[recovered(kl[i][j], j) for j in range(m)] for i in range(m)],
        "kl_ablation": dict(zip(models, abl)),
        "resample_only": {models[j]: {"top1_agreement": cell(s.res_agree[j], j),
                                      "kl": cell(s.res_kl[j], j),
                                      "kl_recovered": recovered(cell(s.res_kl[j], j), j)}
                          for j in range(m)},
    }


def format_table(section: dict[str, Any]) -> str:
    """The section as a terminal table: rows = source model, columns = target model."""
    if "skipped" in section:
        return f"  faithfulness: skipped ({section['skipped']})"
    models = section["models"]

    def fmt(v: float | None, pct: bool = False) -> str:
        return "   n/a" if v is None else (f"{100 * v:5.1f}%" if pct else f"{v:6.3f}")

    width = max(len(m) for m in models) + 2
    head = " " * (width + 2) + "".join(f"{m:>22}" for m in models)
    lines = [f"  faithfulness through each model's head ({section['n_images']} images; row: "
             "source code, column: target model; top-1 agreement / KL recovered):", head]
    for i, src in enumerate(models):
        cells = "".join(f"{fmt(section['top1_agreement'][i][j], True):>12} / "
                        f"{fmt(section['kl_recovered'][i][j])}" for j in range(len(models)))
        lines.append(f"  {src:<{width}}{cells}")
    res = "".join(f"{fmt(section['resample_only'][m]['top1_agreement'], True):>12} / "
                  f"{fmt(section['resample_only'][m]['kl_recovered'])}" for m in models)
    abl = "".join(f"{fmt(section['kl_ablation'][m]):>22}" for m in models)
    lines += [f"  {'grid only':<{width}}{res}", f"  {'ablation KL':<{width}}{abl}"]
    return "\n".join(lines)
