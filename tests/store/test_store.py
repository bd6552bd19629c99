import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usae.data.sources import StoreSource
from usae.errors import UsaeError
from usae.store.store import ModelEntry, Store, from_storage, to_storage
from usae.store.writer import Part, StoreWriter, read_progress, store_from_arrays


@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("float16", 1e-2), ("bfloat16", 1e-1)])
def test_round_trip_and_info(arrays, tmp_path, dtype, tol):
    store = store_from_arrays(tmp_path / "s", arrays, dtype=dtype)
    info = store.info()
    assert info["models"] == {m: {"d": a.shape[2], "tokens": a.shape[1]} for m, a in arrays.items()}
    assert info["n_images"] == 48 and sum(info["splits"].values()) == 48
    assert info["splits"]["val"] == 5  # a seeded 10% held out
    rows = np.arange(48)[::-1].copy()
    np.testing.assert_allclose(store.read("m1", rows).numpy(), arrays["m1"][rows], atol=tol,
                               rtol=tol)
    assert store.read("m1", rows).dtype.is_floating_point


def test_bfloat16_storage_conversion():
    x = np.array([1.0, -2.5, 3.140625], np.float32)
    np.testing.assert_array_equal(from_storage(to_storage(x, "bfloat16"), "bfloat16").numpy(), x)


def test_store_source_epoch_covers_every_image_once(arrays, tmp_path):
    store = store_from_arrays(tmp_path / "s", arrays, dtype="float32")
    src = StoreSource(store, "train", chunk_images=4, buffer_chunks=2)
    n = src.n_images()
    seen = []
    for batch in src.batches(3, seed=0, epoch=0):
        assert set(batch) == set(arrays)
        x = batch["m0"].numpy().reshape(3, 4, -1)
        for img in x:
            seen.append(int(np.argmin(np.abs(arrays["m0"] - img).sum(axis=(1, 2)))))
    assert len(seen) == (n // 3) * 3 and len(set(seen)) == len(seen)
    val_rows = set(store.rows("val").tolist())
    assert not (set(seen) & val_rows)
    # deterministic, and starting at batch b equals skipping b batches
    a = [b["m2"] for b in src.batches(3, 0, 1)]
    b = [b["m2"] for b in src.batches(3, 0, 1, start=4)]
    assert all(np.array_equal(x, y) for x, y in zip(a[4:], b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, [b["m2"] for b in src.batches(3, 0, 2)]))


def test_shuffled_pairing_breaks_the_image_correspondence(arrays, tmp_path):
    store = store_from_arrays(tmp_path / "s", arrays, dtype="float32")
    src = StoreSource(store, "train")
    real = next(src.batches(8, 0, 0))
    shuf = next(src.batches(8, 0, 0, shuffle_pairing=True))
    assert np.array_equal(real["m0"], shuf["m0"])
    assert not np.array_equal(real["m1"], shuf["m1"])


def test_newer_schema_and_damaged_store(arrays, tmp_path):
    store_from_arrays(tmp_path / "s", arrays)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsaeError, match="newer usae"):
        Store(tmp_path / "s")
    manifest["schema_version"] = 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with open(tmp_path / "s" / "acts_m0.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(UsaeError, match="wrong size"):
        Store(tmp_path / "s")
    with pytest.raises(UsaeError, match="not a usae store"):
        Store(tmp_path)


def test_finalized_store_is_never_modified(arrays, tmp_path):
    store_from_arrays(tmp_path / "s", arrays)
    before = (tmp_path / "s" / "acts_m0.bin").read_bytes()
    with pytest.raises(UsaeError, match="finalized"):
        store_from_arrays(tmp_path / "s", arrays)
    assert (tmp_path / "s" / "acts_m0.bin").read_bytes() == before


def _entries():
    return [ModelEntry("a", 3, 2, {})], [{"path": f"img{i}", "label": None, "split": "train"}
                                          for i in range(6)]


def test_full_disk_loses_nothing_and_resumes(tmp_path, monkeypatch):
    models, images = _entries()
    rows = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    w = StoreWriter(tmp_path / "s", models, images, "float32")
    w.commit(0, {"a": rows[:2]}, {})
    real = os.pwrite

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(UsaeError, match=r"writing .*acts_a.bin failed \(No space left.*2 "
                                        r"images committed.*re-run the same command to "
                                        r"resume$"):
        w.commit(2, {"a": rows[2:4]}, {})
    monkeypatch.setattr(os, "pwrite", real)
    w2 = StoreWriter(tmp_path / "s", models, images, "float32")
    assert w2.done == 2
    w2.commit(2, {"a": rows[2:4]}, {})
    w2.commit(4, {"a": rows[4:]}, {3: "corrupt"})
    w2.finalize()
    store = Store(tmp_path / "s")
    np.testing.assert_array_equal(store.read("a", np.array([0, 1, 2, 4, 5])).numpy(),
                                  rows[[0, 1, 2, 4, 5]])
    assert store.info()["skipped"] == 1 and store.manifest["images"][3]["skipped"] == "corrupt"
    assert 3 not in store.rows("all")


def test_writer_checks_shapes_and_values(tmp_path):
    models, images = _entries()
    w = StoreWriter(tmp_path / "s", models, images, "float32")
    with pytest.raises(UsaeError, match="shape"):
        w.commit(0, {"a": np.zeros((2, 2, 4))}, {})
    bad = np.zeros((2, 2, 3))
    bad[1, 1, 1] = np.nan
    with pytest.raises(UsaeError, match="non-finite"):
        w.commit(0, {"a": bad}, {})
    with pytest.raises(UsaeError, match="different image list"):
        StoreWriter(tmp_path / "s", models, images[:3], "float32")
    with pytest.raises(UsaeError, match="not a usae store"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("x")
        StoreWriter(tmp_path / "other", models, images, "float32")


def test_empty_split(arrays, tmp_path):
    store = store_from_arrays(tmp_path / "s", arrays)
    with pytest.raises(UsaeError, match="split 'test'.*empty"):
        StoreSource(store, "test")


@given(n=st.integers(1, 7), tokens=st.integers(1, 4), d=st.integers(1, 5),
       dtype=st.sampled_from(["float16", "bfloat16", "float32"]), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_arrays_round_trip_through_a_store(tmp_path, n, tokens, d, dtype, seed):
    """Property: every row reads back as the storage-dtype rounding of what was written, in
    the same row, for every model, through both read paths."""
    rng = np.random.default_rng(seed)
    arrays = {"p": rng.normal(size=(n, tokens, d)).astype(np.float32),
              "q": rng.normal(size=(n, tokens, d + 1)).astype(np.float32)}
    import tempfile

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "s"
    store = store_from_arrays(path, arrays, dtype=dtype, splits=["train"] * n, batch=3)
    rows = rng.permutation(n)
    for m, a in arrays.items():
        want = from_storage(to_storage(a, dtype), dtype)
        torch.testing.assert_close(store.read(m, rows), want[rows], rtol=0, atol=0)
    assert store.verify()


def test_content_hash_is_sha256_of_images_dtype_and_every_byte(arrays, tmp_path):
    """Guards the content hash against hashlib written out: the image paths and dtype as JSON,
    then each model's name, a NUL byte and every byte of its array, in model order."""
    import hashlib

    store = store_from_arrays(tmp_path / "s", arrays, dtype="float16")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    h = hashlib.sha256(json.dumps([[i["path"] for i in manifest["images"]], "float16"]).encode())
    for m in arrays:
        h.update(m.encode() + b"\0" + (tmp_path / "s" / f"acts_{m}.bin").read_bytes())
    assert manifest["content_hash"] == h.hexdigest() and store.verify()


def test_store_attributes_info_and_read_only_arrays(arrays, tmp_path):
    """Guards the Store's dims, tokens, info keys, read-only memory maps, the default split of
    `rows()`, split counts without skipped images, and reading no rows at all."""
    store_from_arrays(tmp_path / "s", arrays, dtype="float32")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["images"][0]["skipped"] = True
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    store = Store(tmp_path / "s")
    assert store.dims == tuple(a.shape[2] for a in arrays.values())
    assert store.tokens == arrays["m0"].shape[1]
    assert not store.array("m0").flags.writeable
    assert store.rows().tolist() == list(range(1, 48))
    split0 = manifest["images"][0]["split"]
    assert store.splits()[split0] == sum(1 for i in manifest["images"][1:] if i["split"] == split0)
    info = store.info()
    assert set(info) == {"models", "n_images", "splits", "dtype", "schema_version", "skipped",
                         "content_hash"}
    assert (info["dtype"], info["schema_version"], info["skipped"]) == ("float32", 1, 1)
    assert info["content_hash"] == manifest["content_hash"]
    empty = store.read("m0", np.array([], dtype=np.int64))
    assert tuple(empty.shape) == (0,) + arrays["m0"].shape[1:]


def test_a_corrupt_manifest_is_named(arrays, tmp_path):
    store_from_arrays(tmp_path / "s", arrays)
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(UsaeError, match=r"^store manifest .*manifest.json is corrupt"):
        Store(tmp_path / "s")


def test_prefetch_asks_for_each_contiguous_run(arrays, tmp_path, monkeypatch):
    """Guards the read-ahead hints: one POSIX_FADV_WILLNEED per contiguous run of rows and
    model, at the run's byte offset and length; a single row too, and none for no rows."""
    store = store_from_arrays(tmp_path / "s", arrays, dtype="float16")
    calls = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, length, advice: calls.append((off, length, advice)),
                        raising=False)
    store.prefetch(np.array([7, 2, 3, 4]))
    row = {m: a.shape[1] * a.shape[2] * 2 for m, a in arrays.items()}
    expected = []
    for m in arrays:
        expected += [(2 * row[m], 3 * row[m], os.POSIX_FADV_WILLNEED),
                     (7 * row[m], row[m], os.POSIX_FADV_WILLNEED)]
    assert calls == expected
    calls.clear()
    store.prefetch(np.array([5]))
    assert calls == [(5 * row[m], row[m], os.POSIX_FADV_WILLNEED) for m in arrays]
    calls.clear()
    store.prefetch(np.array([], dtype=np.int64))
    assert calls == []


def test_a_store_resumes_only_with_the_same_number_of_writers(tmp_path):
    """Guards the layout check: progress files of another number of writers are refused
    (naming them), and a writer's recorded rows must match its part, an empty part included."""
    models, images = _entries()
    rows = np.zeros((6, 2, 3), np.float32)
    StoreWriter(tmp_path / "s", models, images, "float32", part=Part(0, 0, 0, 2))
    w1 = StoreWriter(tmp_path / "s", models, images, "float32", part=Part(0, 6, 1, 2))
    w1.commit(0, {"a": rows[:2]}, {})
    for part in (None, Part(0, 3, 0, 3)):
        with pytest.raises(UsaeError, match=r"different number of processes "
                                            r"\(progress.rank0of2.safetensors, "
                                            r"progress.rank1of2.safetensors\)"):
            StoreWriter(tmp_path / "s", models, images, "float32", part=part)
    with pytest.raises(UsaeError, match=r"rows were 0..0, now 0..3"):
        StoreWriter(tmp_path / "s", models, images, "float32", part=Part(0, 3, 0, 2))
    w1 = StoreWriter(tmp_path / "s", models, images, "float32", part=Part(0, 6, 1, 2))
    assert w1.done == 2
    rows = np.arange(36, dtype=np.float32).reshape(6, 2, 3)
    w1.commit(2, {"a": rows[2:]}, {})
    w0 = StoreWriter(tmp_path / "s", models, images, "float32", part=Part(0, 0, 0, 2))
    w0.finalize()
    store = Store(tmp_path / "s")
    np.testing.assert_array_equal(store.read("a", np.arange(2, 6)).numpy(), rows[2:])


def test_progress_files_of_older_versions_and_skipped_keys(tmp_path):
    """Guards reading a progress header: lo 0 and hi -1 when a file predates parts, and the
    skipped images' indices as integers."""
    from safetensors.torch import save_file

    from usae.store.stats import StatsAccumulator

    sums = {"sum.a": torch.zeros(3, dtype=torch.float64), "sumsq.a": torch.ones(3,
                                                                                dtype=torch.float64),
            "count.a": torch.tensor([4])}
    save_file(sums, tmp_path / "p.safetensors", metadata={"done": "4", "skipped": '{"2": "bad"}'})
    done, lo, hi, skipped, accs = read_progress(tmp_path / "p.safetensors",
                                                {"a": StatsAccumulator(3)})
    assert (done, lo, hi, skipped) == (4, 0, -1, {2: "bad"})
    assert accs["a"].count == 4 and accs["a"].sumsq_d.dtype == np.float64


def test_store_from_arrays_records_specs_paths_and_seeded_splits(tmp_path):
    """Guards store_from_arrays: one model alone, each model's spec, the given image paths
    with no label, and the default seed's split (pinned: an older store must read the same)."""
    arrays = {"solo": np.arange(20 * 2 * 3, dtype=np.float32).reshape(20, 2, 3)}
    store = store_from_arrays(tmp_path / "s", arrays, paths=[f"p{i}.png" for i in range(20)])
    assert store.manifest["models"]["solo"]["spec"] == "array:solo"
    assert store.manifest["images"][3]["path"] == "p3.png"
    assert all(i["label"] is None and "label" in i for i in store.manifest["images"])
    assert store.rows("val").tolist() == [5, 12]


def test_short_writes_are_completed_and_no_sums_are_kept(tmp_path, monkeypatch):
    """Guards the pwrite loop (a short write continues at the right offset), finalize's
    check of a single writer's rows, and that only shards keep raw sums by default."""
    models, images = _entries()
    rows = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, data[:7], offset))
    w = StoreWriter(tmp_path / "s", models, images, "float32")
    w.commit(0, {"a": rows[:4]}, {})
    with pytest.raises(UsaeError, match="internal: finalize with 4/6 rows done"):
        w.finalize()
    w.commit(4, {"a": rows[4:]}, {})
    w.finalize()
    monkeypatch.setattr(os, "pwrite", real)
    store = Store(tmp_path / "s")
    np.testing.assert_array_equal(store.read("a", np.arange(6)).numpy(), rows)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["acts_a.bin", "manifest.json"]


def _two_models():
    models = [ModelEntry("a", 3, 2, {}), ModelEntry("b", 2, 2, {})]
    images = [{"path": f"img{i}", "label": None, "split": "train"} for i in range(6)]
    return models, images


def test_writer_defaults_building_state_and_its_checks(tmp_path):
    """Guards the writer's default dtype (float16), the manifest's 'building' state until
    finalize, the batch checks (models agreeing on the batch size, rows past the writer's part,
    the non-finite message's image range) and the statistics leaving out skipped images of a
    later batch."""
    models, images = _two_models()
    w = StoreWriter(tmp_path / "s", models, images)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert w.dtype == "float16" and manifest["dtype"] == "float16"
    assert manifest["state"] == "building"
    with pytest.raises(UsaeError, match=r"not finished \(state 'building'\)"):
        Store(tmp_path / "s")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 2, 3)), rng.normal(size=(6, 2, 2))
    with pytest.raises(UsaeError, match=r"^internal: models disagree on the batch size$"):
        w.commit(0, {"a": a[:3], "b": b[:2]}, {})
    w.commit(0, {"a": a[:3], "b": b[:3]}, {})
    bad = a[3:].copy()
    bad[1, 0, 0] = np.inf
    with pytest.raises(UsaeError, match=r"non-finite activations in images 3\.\.5$"):
        w.commit(3, {"a": bad, "b": b[3:]}, {})
    with pytest.raises(UsaeError, match="belong to another writer"):
        w.commit(3, {"a": a[2:], "b": b[2:]}, {})
    w.commit(3, {"a": a[3:], "b": b[3:]}, {4: "corrupt"})
    manifest = w.finalize()
    kept = [0, 1, 2, 3, 5]
    stats = Store(tmp_path / "s").stats()["a"]
    assert stats.mean == pytest.approx(float(a[kept].mean()), abs=1e-6)
    np.testing.assert_allclose(stats.mean_d, a[kept].reshape(-1, 3).mean(0), atol=1e-6)


def test_finalized_at_is_utc(tmp_path, monkeypatch):
    """Guards the finalization time: ISO 8601 in UTC whatever the local time zone."""
    import re
    import time

    monkeypatch.setenv("TZ", "JST-9")  # POSIX form: needs no tzdata
    time.tzset()
    try:
        models, images = _entries()
        w = StoreWriter(tmp_path / "s", models, images, "float32")
        w.commit(0, {"a": np.zeros((6, 2, 3))}, {})
        stamp = w.finalize()["finalized_at"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    utc = time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(utc - time.time()) < 120


def test_parts_record_their_rows_and_skips_and_only_writer_zero_creates(tmp_path):
    """Guards the progress header of a part (lo, hi, skipped indices), a writer other than 0
    refusing to create the store, and writer 0 clearing stale temp files."""
    models, images = _entries()
    with pytest.raises(UsaeError, match="writer 1 opened .* before writer 0 created it"):
        StoreWriter(tmp_path / "s", models, images, "float32", part=Part(2, 6, 1, 2))
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / ".manifest.json.x.tmp").write_text("left by a kill")
    StoreWriter(tmp_path / "s", models, images, "float32", part=Part(0, 2, 0, 2))
    assert not (tmp_path / "s" / ".manifest.json.x.tmp").exists()
    w1 = StoreWriter(tmp_path / "s", models, images, "float32", part=Part(2, 6, 1, 2))
    (tmp_path / "s" / ".other.tmp").write_text("a temp of a live writer 0")
    w1.commit(2, {"a": np.zeros((2, 2, 3))}, {3: "corrupt"})
    StoreWriter(tmp_path / "s", models, images, "float32", part=Part(2, 6, 1, 2))
    assert (tmp_path / "s" / ".other.tmp").exists()
    from usae.store.stats import StatsAccumulator

    done, lo, hi, skipped, _ = read_progress(tmp_path / "s" / "progress.rank1of2.safetensors",
                                             {"a": StatsAccumulator(3)})
    assert (done, lo, hi, skipped) == (4, 2, 6, {3: "corrupt"})


def test_writers_keep_each_others_rows_and_finalize_needs_every_part_whole(tmp_path):
    """Guards writers sharing a store: writer 1 opening after writer 0 wrote rows leaves them
    (only writer 0 reserves the files); writer 0 re-opened after a kill that left only the
    manifest reserves them again; finalize refuses a part that starts in its place but is not
    whole; and the statistics merge every part's sums (equal to naive ones over all rows)."""
    models, images = _entries()
    rows = np.random.default_rng(1).normal(size=(6, 2, 3)).astype(np.float32)
    s = tmp_path / "s"
    w0 = StoreWriter(s, models, images, "float32", part=Part(0, 3, 0, 2))
    w0.commit(0, {"a": rows[:3]}, {})
    w1 = StoreWriter(s, models, images, "float32", part=Part(3, 6, 1, 2))
    w1.commit(3, {"a": rows[3:4]}, {})
    with pytest.raises(UsaeError, match=r"^process 1 committed rows 3\.\.4 of 3\.\.6; "):
        w0.finalize()
    w1.commit(4, {"a": rows[4:]}, {})
    w0.finalize()
    store = Store(s)
    np.testing.assert_array_equal(store.read("a", np.arange(6)).numpy(), rows)
    flat = rows.reshape(-1, 3).astype(np.float64)
    stats = store.stats()["a"]
    np.testing.assert_allclose(stats.mean_d, flat.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.std_d, flat.std(0), rtol=1e-9)
    assert stats.std == pytest.approx(float(flat.std()), rel=1e-9)

    crash = tmp_path / "crash"
    StoreWriter(crash, models, images, "float32", part=Part(0, 3, 0, 2))
    for leftover in [*crash.glob("acts_*.bin"), *crash.glob("progress*")]:
        leftover.unlink()  # killed between the manifest and the first progress file
    w0 = StoreWriter(crash, models, images, "float32", part=Part(0, 3, 0, 2))
    w0.commit(0, {"a": rows[:3]}, {})
    assert (crash / "acts_a.bin").stat().st_size == 6 * 2 * 3 * 4


def test_wait_for_parts_returns_only_when_every_part_is_done(tmp_path):
    """Guards writer 0's wait before finalizing: a missing progress file, or any writer short
    of its last row (first or last in rank order), keeps it waiting."""
    import threading

    from usae.store.writer import wait_for_parts

    models, images = _entries()
    rows = np.zeros((6, 2, 3), np.float32)
    s = tmp_path / "s"

    def returns() -> bool:
        t = threading.Thread(target=wait_for_parts, args=(s, 2, 0.005), daemon=True)
        t.start()
        t.join(0.3)
        return not t.is_alive()

    w0 = StoreWriter(s, models, images, "float32", part=Part(0, 3, 0, 2))
    w1 = StoreWriter(s, models, images, "float32", part=Part(3, 6, 1, 2))
    w1.commit(3, {"a": rows[3:4]}, {})
    (s / "progress.rank0of2.safetensors").rename(s / "held")
    assert not returns()  # writer 0's file missing, writer 1 short
    (s / "held").rename(s / "progress.rank0of2.safetensors")
    w1.commit(4, {"a": rows[4:]}, {})
    assert not returns()  # writer 0 short, writer 1 done
    w0.commit(0, {"a": rows[:3]}, {})
    assert returns()
