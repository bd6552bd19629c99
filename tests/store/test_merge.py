"""usae store merge (usae.store.merge) in process: shards written by ranks as threads, then
joined; the merged store is compared byte for byte with the parts, and each refusal is
provoked by editing a shard's manifest by hand."""

from __future__ import annotations

import datetime
import json
import shutil

import numpy as np
import pytest

from tests.conftest import RecordingBar, exactly, prebuilt
from tests.data.test_cache import VIT, _run_ranks, _serial_builds, make_images
from usae.data.cache import cache
from usae.errors import UsaeError
from usae.store import merge as merge_module
from usae.store.merge import merge_shards
from usae.store.store import Store, read_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of one 12-image cache (ranks as threads; no merge code runs here)."""
    root = tmp_path_factory.mktemp("merge")

    def build(dest):
        imgs = make_images(dest / "imgs", n=12)
        with pytest.MonkeyPatch.context() as mp:
            _serial_builds(mp)
            _run_ranks(3, lambda d: cache(VIT, imgs, dest / "unused", dist=d, batch_size=4,
                                          workers=0, dtype="float32", progress=False,
                                          shard_dir=str(dest / "shards")), mp)

    prebuilt("merge-shards", root, build)
    return sorted((root / "shards").iterdir())


@pytest.fixture
def copies(shards, tmp_path):
    """Editable copies of the shards."""
    out = []
    for p in shards:
        shutil.copytree(p, tmp_path / p.name)
        out.append(tmp_path / p.name)
    return out


def _edit(shard, change):
    manifest = read_manifest(shard)
    change(manifest)
    (shard / "manifest.json").write_text(json.dumps(manifest))


def test_the_merged_rows_are_the_shards_rows_in_order(shards, tmp_path):
    manifest = merge_shards([shards[2], shards[0], shards[1]], tmp_path / "m", progress=False)
    merged = Store(tmp_path / "m")
    parts = [read_manifest(p) for p in shards]
    assert manifest == merged.manifest and manifest["merged_from"] == 3
    assert manifest["images"] == [i for m in parts for i in m["images"]]
    assert manifest["n_images"] == sum(1 for m in parts for i in m["images"]
                                       if not i.get("skipped"))
    assert "shard" not in manifest and manifest["state"] == "final"
    for m in merged.models:
        whole = (tmp_path / "m" / f"acts_{m}.bin").read_bytes()
        assert whole == b"".join((p / f"acts_{m}.bin").read_bytes() for p in shards)
    assert manifest["models"] == parts[0]["models"] and manifest["dtype"] == parts[0]["dtype"]
    assert set(manifest) == (set(parts[0]) - {"shard"}) | {"merged_from"}
    stamp = datetime.datetime.strptime(manifest["finalized_at"], "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - stamp).total_seconds()) < 600  # UTC, now
    assert merged.verify(), "the manifest's content hash is that of the merged bytes"


def test_the_merged_store_is_stamped_in_utc_whatever_the_local_zone(shards, tmp_path,
                                                                     monkeypatch):
    import time

    monkeypatch.setenv("TZ", "JST-9")  # POSIX form: needs no tzdata
    time.tzset()
    try:
        stamp = merge_shards(shards, tmp_path / "m", progress=False)["finalized_at"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    utc = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - utc).total_seconds()) < 600


def test_the_merged_statistics_are_those_of_every_row(shards, tmp_path):
    merge_shards(shards, tmp_path / "m", progress=False)
    merged = Store(tmp_path / "m")
    for m in merged.models:
        x = np.asarray(merged.array(m), dtype=np.float64)
        rows = x[[i for i, e in enumerate(merged.manifest["images"]) if not e.get("skipped")]]
        flat = rows.reshape(-1, x.shape[-1])
        stats = merged.stats()[m]
        np.testing.assert_allclose(stats.mean_d, flat.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats.std_d, flat.std(0), rtol=1e-6, atol=1e-9)


def test_shards_are_ordered_by_their_index_not_their_names(shards, tmp_path):
    renamed = []
    for name, p in zip(("c", "a", "b"), shards):  # names sort as 1, 2, 0
        shutil.copytree(p, tmp_path / name)
        renamed.append(tmp_path / name)
    manifest = merge_shards(renamed, tmp_path / "m", progress=False)
    assert manifest["images"] == [i for p in shards for i in read_manifest(p)["images"]]


def test_a_folder_of_other_files_is_refused_unless_forced(shards, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with exactly(f"{tmp_path / 'm'} is not empty and is not a usae store folder — pass --force "
                 "to replace it, or choose another --out"):
        merge_shards(shards, tmp_path / "m", progress=False)
    merge_shards(shards, tmp_path / "m", force=True, progress=False)
    assert not (tmp_path / "m" / "notes.txt").exists()


def test_a_finished_store_is_replaced_only_with_force(shards, tmp_path):
    merge_shards(shards, tmp_path / "m", progress=False)
    with exactly(f"{tmp_path / 'm'} already holds a store — pass --force to replace it, or "
                "choose another --out"):
        merge_shards(shards, tmp_path / "m", progress=False)
    merge_shards(shards, tmp_path / "m", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp left beside it


@pytest.mark.parametrize("where", ["itself", "inside", "above"])
def test_an_out_that_overlaps_a_shard_is_refused(copies, where):
    out = {"itself": copies[1], "inside": copies[1] / "x", "above": copies[1].parent}[where]
    first = copies[0] if where == "above" else copies[1]  # (the first shard it overlaps)
    with exactly(f"--out {out} overlaps the shard {first}: merging would destroy its input "
                "— choose another --out"):
        merge_shards(copies, out, force=True, progress=False)


def test_no_shards_or_a_missing_one_or_a_repeat_is_refused(copies, tmp_path):
    with exactly("no shards given — usage: usae store merge SHARD... --out STORE"):
        merge_shards([], tmp_path / "m")
    with exactly("the run wrote 3 shards; got indices [0, 2] — pass each shard once"):
        merge_shards([copies[0], copies[2]], tmp_path / "m")
    with exactly("the run wrote 3 shards; got indices [0, 1, 1, 2] — pass each shard once"):
        merge_shards([copies[0], copies[1], copies[1], copies[2]], tmp_path / "m")


def test_an_unfinished_store_or_a_plain_store_is_not_a_shard(copies, tmp_path):
    _edit(copies[1], lambda m: m.update(state="partial"))
    with exactly(f"{copies[1]} is not finished (state 'partial') — re-run its cache command to "
                "complete it"):
        merge_shards(copies, tmp_path / "m")
    _edit(copies[1], lambda m: (m.update(state="final"), m.pop("shard")))
    with exactly(f"{copies[1]} is not a shard written by `usae cache --shard-dir`"):
        merge_shards(copies, tmp_path / "m")
    (copies[2] / "sums.safetensors").unlink()
    with exactly(f"{copies[2]} is not a shard written by `usae cache --shard-dir`"):
        merge_shards([copies[0], copies[2]], tmp_path / "m")


@pytest.mark.parametrize("key, message", [
    ("models", "{p} has different models from {first}"),
    ("dtype", "{p} has different dtype from {first}"),
    ("list_hash", "{p} comes from a different image list than {first}"),
    ("start", "{p} starts at image 5, expected 4"),
    ("n_total", "the shards hold {n} of 99 images"),
])
def test_shards_of_different_runs_are_refused(copies, tmp_path, key, message):
    def change(m):
        if key == "models":
            m["models"] = {"other": {"d": 1}}
        elif key == "dtype":
            m["dtype"] = "float16"
        elif key == "start":
            m["shard"]["start"] = 5
        else:  # list_hash, n_total
            m["shard"][key] = "x" if key == "list_hash" else 99

    target = copies[0] if key == "n_total" else copies[1]
    n = sum(len(read_manifest(p)["images"]) for p in copies)
    _edit(target, change)
    with exactly(message.format(p=copies[1], first=copies[0], n=n)):
        merge_shards(copies, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_failed_write_is_one_line_and_leaves_nothing(shards, tmp_path, monkeypatch):
    def full(parts, dest, bar):
        raise merge_module.write_error(dest, OSError(28, "No space left on device"))

    monkeypatch.setattr(merge_module, "_concatenate", full)
    with pytest.raises(UsaeError, match="No space left on device — free some space"):
        merge_shards(shards, tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_concatenate_turns_an_os_error_into_a_usae_error(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    bar = RecordingBar()
    merge_module._concatenate([tmp_path / "a", tmp_path / "a"], tmp_path / "out", bar)
    assert bar.updates == [3, 3]
    assert (tmp_path / "out").read_bytes() == b"abcabc"
    with pytest.raises(UsaeError, match=r"^cannot write .*nowhere/out: "):
        merge_module._concatenate([tmp_path / "a"], tmp_path / "nowhere" / "out", bar)


def test_the_progress_bar_counts_bytes(shards, tmp_path, progress_bars):
    bars = progress_bars(merge_module)
    merge_shards(shards, tmp_path / "m")
    total = sum(f.stat().st_size for p in shards for f in p.glob("acts_*.bin"))
    assert bars[0].kw == {"total": total, "desc": "merge", "unit": "B", "unit_scale": True,
                          "disable": False}
    assert bars[0].n == total and bars[0].closed
