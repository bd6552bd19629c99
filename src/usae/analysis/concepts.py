"""``usae concepts``: look at concepts in the terminal, from an eval folder.

Reads ``EVAL/concepts.csv`` and ``EVAL/top_images.safetensors`` (and, with a store, the paths
of the top images). Ranks by energy; ``universal_only`` keeps the universal class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from usae.analysis.eval_folder import TOP_IMAGES_FILE, by_energy, read_concepts, read_report
from usae.errors import UsaeError
from usae.files import load_safetensors
from usae.store.store import read_manifest


def concept_table(eval_dir: str | Path, concepts: list[int] | None = None, top: int = 10,
                  universal_only: bool = False, store: str | Path | None = None,
                  images: int = 3, models: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per concept: id, class, energy, firing entropy, fires per model, and the
    paths (or store rows) of its top ``images`` images by mean activation. ``models``: the
    run's models, which the eval must have been computed for."""
    eval_dir = Path(eval_dir)
    report = read_report(eval_dir)
    if models is not None and report.models != list(models):
        raise UsaeError(f"{eval_dir} is an eval of models {report.models}, not of this run's "
                        f"{list(models)}")
    rows = read_concepts(eval_dir)
    n = len(rows)
    if concepts is not None:
        bad = [k for k in concepts if not 0 <= k < n]
        if bad:
            raise UsaeError(f"concept(s) {bad} do not exist; this run has concepts 0..{n - 1}")
        chosen = [rows[k] for k in concepts]
    else:
        chosen = by_energy(rows, universal_only)[:top]
    top_rows = load_safetensors(eval_dir / TOP_IMAGES_FILE)["rows.mean"]
    paths = [i["path"] for i in read_manifest(store)["images"]] if store else None
    out = []
    for r in chosen:
        k = int(r["concept"])
        best = [int(x) for x in top_rows[k, :images].tolist() if x >= 0]
        out.append({"concept": k, "class": r["class"], "energy": float(r["energy"]),
                    "firing_entropy": None if r["firing_entropy"] == "" else
                    float(r["firing_entropy"]),
                    "fires": {m: int(r[f"fires_{m}"]) for m in report.models},
                    "top_images": [paths[i] if paths else f"row {i}" for i in best]})
    return out


def format_table(table: list[dict[str, Any]]) -> str:
    """A plain-text table, one block per concept."""
    lines = []
    for c in table:
        fe = "-" if c["firing_entropy"] is None else f"{c['firing_entropy']:.2f}"
        fires = ", ".join(f"{m} {v}" for m, v in c["fires"].items())
        lines.append(f"concept {c['concept']:>5}  {c['class']:<16} energy {c['energy']:.4g}  "
                     f"FE {fe}  fires: {fires}")
        for p in c["top_images"]:
            lines.append(f"    {p}")
    return "\n".join(lines)
