"""``usae eval``: cross-model R², universality metrics, top images and plots, streamed.

Memory is bounded by one batch: codes stay sparse (values, indices), concept statistics are
(M, n) accumulators, and top images are merged per batch into (n, T) tables.

Definitions (τ = ``threshold``, default 0.1 as in the reference):
- fire of concept k in model m: a token with z_k^m > τ; co-fire: every model's z_k > τ
- energy_k = Σ_m ‖mean_x z_k^m(x) · D_k^m‖₂ with the normalized dictionary
- firing entropy FE_k = −Σ_m p log p / log M with p = fires_k^m / Σ_j fires_k^j (0 log 0 = 0)
- co-fire proportion CFP_k^m = cofires_k / fires_k^m
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from usae.errors import UsaeError
from usae.metrics import R2Accumulator
from usae.sae import UniversalSAE, sparse_decode

log = logging.getLogger(__name__)
UNIVERSAL_FE = 0.85  # FE at or above: fires about equally in every model
SPECIFIC_FE = 0.2  # FE at or below: fires (almost) only in one model


class ConceptAccumulator:
    """Per-model, per-concept sums over tokens: fires, co-fires, code sums, activity."""

    def __init__(self, models: tuple[str, ...], n: int, threshold: float, top: int) -> None:
        m = len(models)
        self.models, self.n, self.threshold, self.top = models, n, threshold, top
        self.fires = torch.zeros(m, n, dtype=torch.float64)
        self.active = torch.zeros(m, n, dtype=torch.float64)
        self.code_sum = torch.zeros(m, n, dtype=torch.float64)
        self.cofires = torch.zeros(n, dtype=torch.float64)
        self.l0_sum = torch.zeros(m, dtype=torch.float64)
        self.tokens = 0
        # top images: score = mean activation over the image's tokens
        self.top_rows = {key: torch.full((n, 0), -1, dtype=torch.long)
                         for key in ("mean", *models)}
        self.top_scores = {key: torch.zeros(n, 0) for key in ("mean", *models)}

    def update(self, codes: dict[str, tuple[Tensor, Tensor]], rows: Tensor, tokens: int) -> None:
        """``codes[m] = (values_nk, indices_nk)`` for N = len(rows) * tokens aligned tokens.

        Everything stays sparse: co-fires are (token, concept) keys present in every model,
        per-image means are index_add over those keys."""
        n_tok = next(iter(codes.values()))[0].shape[0]
        n_img = len(rows)
        token_of = torch.arange(n_tok).unsqueeze(1)
        image_of = (token_of // tokens) * self.n
        fired_keys, per_image = [], {}
        for j, m in enumerate(self.models):
            vals, idx = codes[m]
            vals, idx = vals.double().cpu(), idx.cpu()
            fired = vals > self.threshold
            ones = torch.ones(int(fired.sum()), dtype=torch.float64)
            self.fires[j].index_add_(0, idx[fired], ones)
            pos = vals > 0
            self.active[j].index_add_(0, idx[pos], torch.ones(int(pos.sum()), dtype=torch.float64))
            self.code_sum[j].index_add_(0, idx.flatten(), vals.flatten())
            self.l0_sum[j] += float(pos.sum())
            fired_keys.append((token_of * self.n + idx)[fired])
            sums = torch.zeros(n_img * self.n, dtype=torch.float64)
            sums.index_add_(0, (image_of + idx).flatten(), vals.flatten())
            per_image[m] = (sums.view(n_img, self.n) / tokens).float()  # (B, n)
        keys, counts = torch.unique(torch.cat(fired_keys), return_counts=True)
        full = keys[counts == len(self.models)] % self.n
        self.cofires.index_add_(0, full, torch.ones(len(full), dtype=torch.float64))
        self.tokens += n_tok
        per_image["mean"] = torch.stack([per_image[m] for m in self.models]).mean(0)
        for key, scores in per_image.items():
            self._merge_top(key, scores.T, rows)

    def _merge_top(self, key: str, scores_nb: Tensor, rows: Tensor) -> None:
        all_scores = torch.cat([self.top_scores[key], scores_nb], dim=1)
        all_rows = torch.cat([self.top_rows[key], rows.expand(self.n, -1)], dim=1)
        k = min(self.top, all_scores.shape[1])
        best, pos = torch.topk(all_scores, k, dim=1)
        self.top_scores[key], self.top_rows[key] = best, all_rows.gather(1, pos)


def _entropy(fires_mn: np.ndarray) -> np.ndarray:
    """Normalized firing entropy per concept; NaN where the concept never fires."""
    m = fires_mn.shape[0]
    total = fires_mn.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = fires_mn / total
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        fe = -plogp.sum(0) / math.log(m) if m > 1 else np.zeros_like(total)
    return np.where(total > 0, np.abs(fe), np.nan)  # abs: no "-0.0" for one-model concepts


def check_run_matches_store(sae: UniversalSAE, run: Path, store) -> None:
    """Errors for different models or dims; a warning for a different layer or alignment."""
    if tuple(store.models) != sae.models:
        raise UsaeError(f"the run has models {list(sae.models)} but the store has "
                        f"{list(store.models)}")
    for m, d_run, d_store in zip(sae.models, sae.cfg.dims, store.dims):
        if d_run != d_store:
            raise UsaeError(f"model {m!r}: the run has d={d_run} but the store has d={d_store}")
    import json

    try:
        recorded = json.loads((run / "config.json").read_text()).get("store", {}).get("models")
    except (OSError, ValueError):
        recorded = None
    if not recorded:
        return
    for m in sae.models:
        now = store.manifest["models"][m]
        was = recorded.get(m, {})
        for key in ("layer", "aligned_grid", "spec", "keep_cls", "prefix_tokens"):
            if key in was and key in now and was[key] != now[key]:
                log.warning("warning: model %r was trained with %s=%r but the store has %r",
                            m, key, was[key], now[key])


def _batches(store, rows: np.ndarray, batch_images: int) -> Iterator[tuple[np.ndarray, dict]]:
    for start in range(0, len(rows), batch_images):
        r = rows[start:start + batch_images]
        yield r, {m: store.read(m, r) for m in store.models}


@torch.no_grad()
def evaluate(run: str | Path, store_path: str | Path, out: str | Path, split: str = "val",
             threshold: float = 0.1, batch_images: int = 32, device: str = "cpu",
             top: int = 16, plots: bool = True, progress: bool = True,
             independent: str | Path | None = None,
             compare: list[str | Path] | None = None) -> dict[str, Any]:
    """Evaluate a run on a store split; write report.json, concepts.csv, top images, plots."""
    from usae.store import Store

    run, out = Path(run), Path(out)
    store = Store(store_path)
    sae = UniversalSAE.load(run, device=device)
    check_run_matches_store(sae, run, store)
    split_used = split
    try:
        rows = store.rows(split)
    except UsaeError:
        if split != "val":
            raise
        log.warning("the store has no 'val' split; evaluating on every image")
        rows, split_used = store.rows("all"), "all"
    stats = _stream(sae, store, rows, threshold, batch_images, top, progress)
    report, concept_rows = _report(sae, stats, threshold, split_used, rows)
    if independent:
        from usae.controls import independent_consistency

        report["independent"] = independent_consistency(sae, independent)
    if compare:
        from usae.controls import compare_runs

        report["comparison"] = compare_runs(report, run, compare, store_path, split_used,
                                            threshold, batch_images, device)
    _write(out, report, concept_rows, stats, sae.models)
    if plots:
        from usae.plots import make_plots

        make_plots(out, report, concept_rows)
    return report


def _stream(sae: UniversalSAE, store, rows: np.ndarray, threshold: float, batch_images: int,
            top: int, progress: bool) -> dict[str, Any]:
    from usae.progress import bar as progress_bar

    models = sae.models
    r2 = R2Accumulator(models, sae.cfg.dims)
    concepts = ConceptAccumulator(models, sae.cfg.n, threshold, top)
    dicts = {m: sae.normalized_dict(m) for m in models}
    device = sae.device_of()
    bar = progress_bar(total=len(rows), desc="eval", unit="img", disable=not progress)
    for batch_rows, raw in _batches(store, rows, batch_images):
        raw = {m: raw[m].reshape(-1, raw[m].shape[-1]).to(device) for m in models}
        r2.update_targets(raw)
        codes = {}
        for i, mi in enumerate(models):
            enc = sae.encode_standardized(mi, sae.standardize(mi, raw[mi]))
            codes[mi] = (enc.values_nk, enc.indices_nk)
            for j, mj in enumerate(models):
                xhat = sae.unstandardize(mj, sparse_decode(enc.values_nk, enc.indices_nk,
                                                           dicts[mj]))
                r2.update_error(i, j, raw[mj], xhat)
        concepts.update(codes, torch.from_numpy(batch_rows), store.tokens)
        bar.update(len(batch_rows))
    bar.close()
    return {"r2": r2, "concepts": concepts,
            "dict_norms": {m: dicts[m].norm(dim=1).double().cpu() for m in models}}


def _report(sae: UniversalSAE, stats: dict[str, Any], threshold: float, split: str,
            rows: np.ndarray) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    models = sae.models
    r2: R2Accumulator = stats["r2"]
    c: ConceptAccumulator = stats["concepts"]
    tokens = max(c.tokens, 1)
    fires = c.fires.numpy()
    mean_code = (c.code_sum / tokens).numpy()
    energy_mn = np.stack([np.abs(mean_code[j]) * stats["dict_norms"][m].numpy()
                          for j, m in enumerate(models)])
    energy = energy_mn.sum(0)
    fe = _entropy(fires)
    cofires = c.cofires.numpy()
    dead = (c.active.numpy() == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cfp = np.where(fires > 0, cofires[None, :] / np.where(fires > 0, fires, 1), np.nan)
    universal = np.nan_to_num(fe, nan=-1) >= UNIVERSAL_FE
    specific = (~np.isnan(fe)) & (fe <= SPECIFIC_FE)
    owner = np.argmax(fires, axis=0)
    off = ~np.eye(len(models), dtype=bool)
    r2_mat = r2.r2()
    report = {
        "models": list(models),
        "r2": _round(r2_mat),
        "r2_paper": _round(r2.r2_paper()),
        "mse": _round(r2.mse()),
        "l0": {m: float(c.l0_sum[j] / tokens) for j, m in enumerate(models)},
        "dead_fraction": {m: float(dead[j].mean()) for j, m in enumerate(models)},
        "n_tokens": int(c.tokens),
        "n_images": int(len(rows)),
        "n_concepts": int(sae.cfg.n),
        "threshold": threshold,
        "split": split,
        "summary": {
            "self_r2_mean": float(np.diag(r2_mat).mean()),
            "cross_r2_mean": float(r2_mat[off].mean()) if off.any() else None,
            "firing_entropy_median": float(np.nanmedian(fe)) if (~np.isnan(fe)).any() else None,
            "never_fire_fraction": float(np.isnan(fe).mean()),
        },
        "concept_classes": {
            "thresholds": {"universal_fe_at_least": UNIVERSAL_FE,
                           "model_specific_fe_at_most": SPECIFIC_FE},
            "universal": int(universal.sum()),
            "model_specific": {m: int((specific & (owner == j)).sum())
                               for j, m in enumerate(models)},
            "never_fire": int(np.isnan(fe).sum()),
        },
    }
    concept_rows = []
    for k in range(sae.cfg.n):
        row: dict[str, Any] = {"concept": k, "energy": float(energy[k]),
                               "firing_entropy": "" if np.isnan(fe[k]) else float(fe[k])}
        for j, m in enumerate(models):
            row[f"fires_{m}"] = int(fires[j, k])
        row["cofires"] = int(cofires[k])
        for j, m in enumerate(models):
            row[f"cofire_proportion_{m}"] = "" if np.isnan(cfp[j, k]) else float(cfp[j, k])
        row["class"] = ("universal" if universal[k] else
                        f"specific:{models[owner[k]]}" if specific[k] else
                        "dead" if np.isnan(fe[k]) else "mixed")
        for j, m in enumerate(models):
            row[f"energy_{m}"] = float(energy_mn[j, k])
        concept_rows.append(row)
    return report, concept_rows


def _round(a: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def _write(out: Path, report: dict[str, Any], concept_rows: list[dict[str, Any]],
           stats: dict[str, Any], models: tuple[str, ...]) -> None:
    from usae.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(concept_rows[0]))
    writer.writeheader()
    writer.writerows(concept_rows)
    atomic_write_text(out / "concepts.csv", buf.getvalue())
    c: ConceptAccumulator = stats["concepts"]
    tensors = {}
    for key in ("mean", *models):
        tensors[f"rows.{key}"] = c.top_rows[key].contiguous()
        tensors[f"scores.{key}"] = c.top_scores[key].float().contiguous()
    atomic_save_safetensors(out / "top_images.safetensors", tensors)


def read_concepts_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
