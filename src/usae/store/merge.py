"""``usae store merge``: join the shard stores of a ``cache --shard-dir`` run into one store.

Shards are finalized stores that each hold a contiguous range of one image list
(``manifest["shard"]``: index, count, start, the list's hash). The merged store has the rows
in image-list order, statistics from the shards' raw sums (``sums.safetensors``: the sums
add exactly as one process would have accumulated them, up to float64 rounding), and a
content hash over the result, so it equals the store one process would have written. It is
built in a temporary sibling folder and swapped in at the end: an interrupted merge leaves
nothing behind and is simply run again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from usae.errors import UsaeError
from usae.files import atomic_write_json, load_safetensors, replace_folder, write_error
from usae.progress import bar as progress_bar
from usae.store.stats import StatsAccumulator
from usae.store.store import MANIFEST, SUMS, acts_file, content_hash, read_manifest
from usae.store.writer import sums_into


def merge_shards(shards: list[str | Path], out: str | Path, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Join ``shards`` (any order) into the store ``out``; returns its manifest."""
    ordered = _check_shards([Path(s) for s in shards])
    _check_out(Path(out), [p for p, _ in ordered], force)
    first = ordered[0][1]
    models = first["models"]
    with replace_folder(out, MANIFEST, force=force, what="store") as tmp:
        total = sum(acts_file(p, m).stat().st_size for p, _ in ordered for m in models)
        bar = progress_bar(total=total, desc="merge", unit="B", unit_scale=True,
                           disable=not progress)
        for m in models:
            _concatenate([acts_file(p, m) for p, _ in ordered], acts_file(tmp, m), bar)
        bar.close()
        manifest = _merged_manifest(ordered)
        manifest["content_hash"] = content_hash(tmp, manifest)
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _check_out(out: Path, shards: list[Path], force: bool) -> None:
    """``out`` is none of the shards (nor inside one, nor holding one), and a finished store
    there is replaced only with ``force``, as ``usae cache`` does."""
    target = out.resolve()
    for p in shards:
        shard = p.resolve()
        if target == shard or shard in target.parents or target in shard.parents:
            raise UsaeError(f"--out {out} overlaps the shard {p}: merging would destroy its "
                            "input — choose another --out")
    if (out / MANIFEST).exists() and not force:
        raise UsaeError(f"{out} already holds a store — pass --force to replace it, or choose "
                        "another --out")


def _check_shards(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Shards sorted by index; every shard of one run present once, ranges contiguous."""
    if not paths:
        raise UsaeError("no shards given — usage: usae store merge SHARD... --out STORE")
    found = []
    for p in paths:
        manifest = read_manifest(p)
        if manifest.get("state") != "final":
            raise UsaeError(f"{p} is not finished (state {manifest.get('state')!r}) — re-run "
                            "its cache command to complete it")
        if "shard" not in manifest or not (p / SUMS).exists():
            raise UsaeError(f"{p} is not a shard written by `usae cache --shard-dir`")
        found.append((p, manifest))
    found.sort(key=lambda pm: pm[1]["shard"]["index"])
    head = found[0][1]
    count = head["shard"]["count"]
    if [m["shard"]["index"] for _, m in found] != list(range(count)):
        have = [m["shard"]["index"] for _, m in found]
        raise UsaeError(f"the run wrote {count} shards; got indices {have} — pass each shard "
                        "once")
    start = 0
    for p, m in found:
        for key in ("models", "dtype"):
            if m[key] != head[key]:
                raise UsaeError(f"{p} has different {key} from {found[0][0]}")
        if m["shard"]["list_hash"] != head["shard"]["list_hash"]:
            raise UsaeError(f"{p} comes from a different image list than {found[0][0]}")
        if m["shard"]["start"] != start:
            raise UsaeError(f"{p} starts at image {m['shard']['start']}, expected {start}")
        start += len(m["images"])
    if start != head["shard"]["n_total"]:
        raise UsaeError(f"the shards hold {start} of {head['shard']['n_total']} images")
    return found


def _concatenate(parts: list[Path], dest: Path, bar: Any) -> None:
    try:
        with open(dest, "wb") as out_fh:
            for part in parts:
                with open(part, "rb") as in_fh:
                    for block in iter(lambda fh=in_fh: fh.read(1 << 24), b""):
                        out_fh.write(block)
                        bar.update(len(block))
            out_fh.flush()
    except OSError as err:
        raise write_error(dest, err) from None


def _merged_manifest(ordered: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    head = ordered[0][1]
    models = head["models"]
    accs = {m: StatsAccumulator(info["d"]) for m, info in models.items()}
    images: list[dict[str, Any]] = []
    for path, manifest in ordered:
        parts = sums_into(load_safetensors(path / SUMS),
                          {m: StatsAccumulator(info["d"]) for m, info in models.items()})
        for m, acc in accs.items():
            acc.merge(parts[m])
        images.extend(manifest["images"])
    keep = {k: v for k, v in head.items()
            if k not in ("shard", "images", "stats", "n_images", "content_hash", "finalized_at")}
    return {**keep, "images": images, "state": "final",
            "stats": {m: acc.result().to_json() for m, acc in accs.items()},
            "n_images": sum(1 for i in images if not i.get("skipped")),
            "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "merged_from": len(ordered)}

