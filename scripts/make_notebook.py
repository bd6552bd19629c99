"""Writes examples/evaluate.ipynb (without outputs) from the cells below: edit here, re-run."""

import nbformat as nbf

md = nbf.v4.new_markdown_cell
code = nbf.v4.new_code_cell
cells = [
md("""# Evaluating a universal sparse autoencoder

This notebook reads a trained run and its evaluation (by default the outputs of `make demo`,
in `demo-output/`) and shows the figures to look at first: the cross-model R² matrix, the
firing-entropy histogram, co-firing against energy, the top universal concepts with their
images and per-model heatmaps, the coordinated activation maximization images when present,
and how to encode your own activations and decode them into another model's space.

Set `USAE_DEMO` to another folder holding `run/`, `store/` and `eval/` to look at your own run."""),
code("""import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from usae import UniversalSAE
from usae.analysis.concepts import concept_table
from usae.analysis.eval_folder import read_concepts
from usae.store.store import Store

ROOT = Path(os.environ.get("USAE_DEMO", "../demo-output"))
RUN, STORE, EVAL = ROOT / "run", ROOT / "store", ROOT / "eval"
report = json.loads((EVAL / "report.json").read_text())
concepts = read_concepts(EVAL)
models = report["models"]
print(f"{len(models)} models: {models}; {report['n_concepts']} concepts; "
      f"evaluated on {report['n_images']} '{report['split']}' images")"""),
md("""## Cross-model reconstruction

Row *i*, column *j*: R² of model *j*'s activations reconstructed from the codes of model *i*.
The diagonal is ordinary SAE reconstruction; off-diagonal cells exist only because the concept
space is shared."""),
code("""r2 = np.asarray(report["r2"])
fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(models), 1.2 + len(models)))
im = ax.imshow(r2, vmin=min(0, r2.min()), vmax=1, cmap="viridis")
for i in range(len(models)):
    for j in range(len(models)):
        ax.text(j, i, f"{r2[i, j]:.2f}", ha="center", va="center",
                color="white" if r2[i, j] < 0.6 else "black")
ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
ax.set_yticks(range(len(models)), models)
ax.set_xlabel("decoded into"); ax.set_ylabel("encoded from")
fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()
off = r2[~np.eye(len(models), dtype=bool)]
print(f"self R² {np.diag(r2).mean():.3f}, cross R² {off.mean():.3f}")"""),
md("""## Faithfulness through each model's own head

R² does not say whether a model would compute the same thing from a reconstruction. `usae eval`
splices each reconstruction in at the cached layer and runs the rest of the target model to its
logits: row *i*, column *j* is the fraction of KL recovered (1 − KL / KL of the mean ablation)
when model *i*'s code is decoded into model *j*, with the top-1 agreement beside it. The
Jaccard matrix says how much the models' active sets overlap on the same tokens."""),
code("""f = report.get("faithfulness") or {}
if "kl_recovered" in f:
    rec = np.array([[np.nan if v is None else v for v in row] for row in f["kl_recovered"]])
    agree = f["top1_agreement"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(models), 1.2 + len(models)))
    im = ax.imshow(rec, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(models)):
        for j in range(len(models)):
            if agree[i][j] is not None and np.isfinite(rec[i, j]):
                ax.text(j, i, f"{rec[i, j]:.2f}\\n{100 * agree[i][j]:.0f}%", ha="center",
                        va="center", fontsize=8, color="white" if rec[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("target model (its head)"); ax.set_ylabel("source code")
    fig.colorbar(im, ax=ax, shrink=0.8, label="KL recovered")
    plt.show()
    print("grid only (no SAE):", {m: v["kl_recovered"] for m, v in f["resample_only"].items()})
else:
    print("no faithfulness in this report:", f.get("skipped", "evaluated without it"))
print("Jaccard of active sets:", report.get("jaccard"))"""),
md("""## Firing entropy

Firing entropy is 1 when a concept fires equally often in every model and 0 when it fires in
one model only. The dashed lines are the thresholds for *universal* and *model-specific*."""),
code("""thr = report["concept_classes"]["thresholds"]
fe = np.array([float(c["firing_entropy"]) for c in concepts if c["firing_entropy"] != ""])
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(fe, bins=np.linspace(0, 1, 26), color="#4477aa", edgecolor="white")
ax.axvline(thr["universal_fe_at_least"], color="#228833", ls="--", label="universal")
ax.axvline(thr["model_specific_fe_at_most"], color="#cc6677", ls="--", label="model-specific")
ax.set_xlabel("firing entropy"); ax.set_ylabel("concepts"); ax.legend()
plt.show()
print(report["concept_classes"])"""),
md("""## Co-firing and energy

Concepts that co-fire across all models more often also carry more energy (the paper's
Figure 5): the shared concepts are the important ones."""),
code("""energy = np.array([float(c["energy"]) for c in concepts])
cofires = np.array([float(c["cofires"]) for c in concepts])
ok = (energy > 0) & (cofires > 0)
fig, ax = plt.subplots(figsize=(5.5, 4))
ax.scatter(cofires[ok], energy[ok], s=8, alpha=0.5)
ax.set_xscale("log"); ax.set_yscale("log")
ax.set_xlabel("co-fires (tokens where every model fires)"); ax.set_ylabel("energy")
plt.show()
if ok.sum() > 2:
    print("log-log correlation:", np.corrcoef(np.log(cofires[ok]), np.log(energy[ok]))[0, 1])"""),
md("""## The top universal concepts

For each of the most energetic universal concepts: its top images, and each model's code for
that concept over the image's token grid (one colour scale per concept)."""),
code("""sae = UniversalSAE.load(RUN)
store = Store(STORE)
h, w = store.grid()
top = concept_table(EVAL, top=3, universal_only=True, store=STORE, images=3)
if not top:
    top = concept_table(EVAL, top=3, store=STORE, images=3)
paths = [i["path"] for i in store.manifest["images"]]
for c in top:
    k = c["concept"]
    rows = np.array([paths.index(p) for p in c["top_images"]])
    maps = {m: sae.encode(m, store.read(m, rows).reshape(-1, store.dims[j]))[:, k]
            .reshape(len(rows), h, w).numpy() for j, m in enumerate(models)}
    vmax = max(float(v.max()) for v in maps.values()) or 1.0
    fig, axes = plt.subplots(1 + len(models), len(rows), squeeze=False,
                             figsize=(2.2 * len(rows), 2.2 * (1 + len(models))))
    for col, p in enumerate(c["top_images"]):
        axes[0, col].imshow(Image.open(p).convert("RGB")); axes[0, col].axis("off")
        for r, m in enumerate(models, start=1):
            axes[r, col].imshow(maps[m][col], vmin=0, vmax=vmax, cmap="magma")
            axes[r, col].set_xticks([]); axes[r, col].set_yticks([])
            if col == 0:
                axes[r, col].set_ylabel(m)
    fig.suptitle(f"concept {k} ({c['class']}, energy {c['energy']:.3g})")
    plt.show()"""),
md("""## Coordinated activation maximization

When `usae cam` has been run, `RUN/cam/<k>/<model>.png` holds, for concept *k*, an image
optimized so that the concept fires in that model; the images of one concept share their
seed and settings, so they differ only by what each model needs."""),
code("""cam_dirs = sorted((RUN / "cam").glob("*/")) if (RUN / "cam").exists() else []
for d in cam_dirs[:3]:
    pngs = [d / f"{m}.png" for m in models if (d / f"{m}.png").exists()]
    if not pngs:
        continue
    fig, axes = plt.subplots(1, len(pngs), figsize=(2.5 * len(pngs), 2.7), squeeze=False)
    for ax, p in zip(axes[0], pngs):
        ax.imshow(Image.open(p)); ax.set_title(p.stem); ax.axis("off")
    fig.suptitle(f"concept {d.name}")
    plt.show()
print(f"{len(cam_dirs)} concepts with CAM images")"""),
md("""## Your own activations

`encode` takes raw activations `(N, d)` of one model (standardization is applied inside) and
returns codes `(N, n)`; `decode` turns codes into any model's raw activations."""),
code("""src, dst = models[0], models[-1]
rows = store.rows(report["split"])[:4]
x_src = store.read(src, rows).reshape(-1, store.dims[0])           # (N, d_src)
codes = sae.encode(src, x_src)                                      # (N, n), k nonzero per row
x_dst = sae.decode(dst, codes)                                      # (N, d_dst), raw space
truth = store.read(dst, rows).reshape(-1, store.dims[-1])
r2 = 1 - ((truth - x_dst) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()
print(f"codes {tuple(codes.shape)}, active per token {(codes > 0).sum(1).float().mean():.1f}")
print(f"{src} -> {dst}: R² {float(r2):.3f} on these {len(rows)} images")"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {
    "name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, "examples/evaluate.ipynb")
