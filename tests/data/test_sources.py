"""Data sources and statistics (``usae.data.sources``, ``usae.store.stats``) against naive numpy."""

import re

import numpy as np
import pytest
import torch

from usae.data.sources import ArraySource, ModelSubset, StoreSource, n_batches
from usae.errors import UsaeError
from usae.store.stats import ModelStats, StatsAccumulator
from usae.store.store import ModelEntry, Store
from usae.store.writer import StoreWriter, store_from_arrays


def test_stats_accumulator_equals_naive_mean_and_std_in_every_mode():
    """Guards the statistics behind standardization: mean and *std* (not the variance), per
    dimension and pooled, streamed in uneven chunks."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(250, 6)) * np.arange(1, 7)
    acc = StatsAccumulator(6)
    for chunk in np.array_split(x, 7):
        acc.update(chunk)
    stats = acc.result()
    np.testing.assert_allclose(stats.mean_d, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std_d, x.std(0), rtol=1e-10)
    assert stats.mean == pytest.approx(x.mean(), rel=1e-12)
    assert stats.std == pytest.approx(x.std(), rel=1e-10)
    mean, std = stats.for_mode("scalar")
    np.testing.assert_allclose(mean, np.full(6, x.mean()))
    np.testing.assert_allclose(std, np.full(6, x.std()))
    mean, std = stats.for_mode("per_dim")
    np.testing.assert_allclose(std, x.std(0), rtol=1e-10)
    mean, std = stats.for_mode("center_per_dim")
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    # one std per model: the root of the mean per-dimension variance
    np.testing.assert_allclose(std, np.full(6, np.sqrt((x.var(0)).mean())), rtol=1e-10)


def test_model_stats_json_round_trip():
    s = ModelStats(1.5, 2.5, np.arange(3.0), np.ones(3))
    back = ModelStats.from_json(s.to_json())
    assert back.mean == 1.5 and back.std == 2.5
    np.testing.assert_array_equal(back.mean_d, s.mean_d)
    np.testing.assert_array_equal(back.std_d, s.std_d)
    assert back.std_d.dtype == np.float64


def test_statistics_of_one_token_small_variance_and_large_float32_values():
    """Guards the accumulator at its edges: one token is enough (std 0), a variance far below
    1 is not clamped, and float32 input is summed in float64 (mean 1000, std 1: float32 sums
    of squares would cancel catastrophically)."""
    one = StatsAccumulator(2)
    one.update(np.array([[3.0, 4.0]], np.float32))
    r = one.result()
    assert r.mean == 3.5 and r.std == 0.5 and r.mean_d.tolist() == [3.0, 4.0]
    rng = np.random.default_rng(0)
    small = rng.normal(0, 0.01, size=(500, 3))
    acc = StatsAccumulator(3)
    acc.update(small)
    assert acc.result().std == pytest.approx(small.std(), rel=1e-9)
    big = (1000 + rng.normal(0, 1, size=(4000, 4))).astype(np.float32)
    acc = StatsAccumulator(4)
    for part in np.array_split(big, 7):
        acc.update(part)
    np.testing.assert_allclose(acc.result().std_d, big.astype(np.float64).std(0), rtol=1e-6)


def test_skipped_images_are_left_out_of_the_statistics(tmp_path):
    """Rows of skipped images are zeros in the array; they must not pull the mean to 0."""
    rng = np.random.default_rng(1)
    acts = rng.normal(5.0, 1.0, size=(6, 2, 3)).astype(np.float32)
    images = [{"path": f"i{i}.jpg", "label": None, "split": "train"} for i in range(6)]
    writer = StoreWriter(tmp_path / "s", [ModelEntry("m", 3, 2, {})], images, "float32")
    batch = acts.copy()
    batch[[1, 4]] = 0.0
    writer.commit(0, {"m": batch}, {1: "broken", 4: "broken"})
    manifest = writer.finalize()
    kept = acts[[0, 2, 3, 5]].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(manifest["stats"]["m"]["mean_d"], kept.mean(0), rtol=1e-6)
    np.testing.assert_allclose(manifest["stats"]["m"]["std_d"], kept.std(0), rtol=1e-5)
    assert Store(tmp_path / "s").rows("all").tolist() == [0, 2, 3, 5]


def test_bfloat16_store_yields_the_stored_bfloat16_values(arrays, tmp_path):
    """Guards reading bf16 bits as bf16 (reading them as fp16 gives garbage)."""
    store = store_from_arrays(tmp_path / "s", arrays, dtype="bfloat16")
    src = StoreSource(store, "all")
    batch = next(src.batches(4, seed=0, epoch=0))
    order = src._rows[src.image_order(0, 0)[:4]]
    for m, a in arrays.items():
        assert batch[m].dtype == torch.bfloat16
        want = torch.from_numpy(a[order].reshape(-1, a.shape[2])).to(torch.bfloat16)
        torch.testing.assert_close(batch[m], want, rtol=0, atol=0)


def test_store_source_batches_are_whole_images_aligned_across_models(arrays, tmp_path):
    store = store_from_arrays(tmp_path / "s", arrays, dtype="float32")
    src = StoreSource(store, "all", chunk_images=8, buffer_chunks=2)
    seen = []
    for b, batch in enumerate(src.batches(5, seed=3, epoch=1)):
        pos = src.image_order(3, 1)[b * 5:(b + 1) * 5]
        for m, a in arrays.items():
            np.testing.assert_array_equal(batch[m].numpy(),
                                          a[src._rows[pos]].reshape(-1, a.shape[2]))
        seen.extend(src._rows[pos].tolist())
    assert len(seen) == len(set(seen)) == n_batches(src, 5) * 5


def test_array_source_order_is_a_function_of_seed_and_epoch(arrays):
    src = ArraySource(arrays)
    a = [b["m0"] for b in src.batches(8, seed=1, epoch=0)]
    b = [b["m0"] for b in src.batches(8, seed=1, epoch=0)]
    c = [b["m0"] for b in src.batches(8, seed=1, epoch=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    resumed = list(src.batches(8, seed=1, epoch=0, start=2))
    assert torch.equal(resumed[0]["m0"], a[2])


def test_model_subset_and_bad_arrays(arrays):
    sub = ModelSubset(ArraySource(arrays), ("m1",))
    assert sub.models == ("m1",) and sub.dims == (8,)
    assert set(next(sub.batches(4, 0, 0))) == {"m1"}
    with pytest.raises(UsaeError, match="unknown model"):
        ModelSubset(ArraySource(arrays), ("zz",))
    bad = dict(arrays)
    bad["m0"] = bad["m0"].copy()
    bad["m0"][0, 0, 0] = np.nan
    with pytest.raises(UsaeError, match="NaN"):
        ArraySource(bad)


def test_data_orders_are_pinned_across_versions():
    """Guards resume across versions: a run resumed by a newer usae must read the images an
    older one would have, so the seeded orders are pinned to these values (any change to a
    seed, salt or chunking shows here), and every order is a permutation, also for 0 images."""
    from usae.data.sources import chunked_order, epoch_permutation, pairing_permutations

    assert epoch_permutation(10, 0, 0).tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    assert chunked_order(10, 3, 2, 0, 0).tolist() == [3, 4, 5, 9, 6, 1, 2, 8, 0, 7]
    assert chunked_order(10, 3, 2, 0, 1).tolist() == [1, 0, 9, 2, 5, 8, 4, 7, 3, 6]
    assert {k: v.tolist() for k, v in pairing_permutations(("a", "b", "c"), 6, 0).items()} == \
        {"a": [0, 1, 2, 3, 4, 5], "b": [3, 4, 0, 5, 1, 2], "c": [0, 3, 4, 1, 2, 5]}
    for n in (0, 1, 7, 64):
        order = chunked_order(n, 4, 3, 5, 2)
        assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))


def _rows_of(batch, arrays_by_model):
    """Which image each whole-image block of a batch is (matched against the arrays)."""
    out = {}
    for m, x in batch.items():
        a = arrays_by_model[m]
        blocks = x.float().numpy().reshape(-1, a.shape[1], a.shape[2])
        out[m] = [int(np.flatnonzero((np.abs(a - b).max(axis=(1, 2)) < 1e-6))[0])
                  for b in blocks]
    return out


@pytest.mark.parametrize("kind", ["array", "store"])
def test_shuffled_pairing_start_and_shards_follow_the_documented_rows(arrays, tmp_path, kind):
    """Guards the control and resume paths of both sources: with shuffle_pairing every model
    reads its own permutation of the same positions (model 0 unshuffled), without it every
    model reads the same image; ``start`` skips whole batches; ModelSubset passes both on."""
    from usae.data.sources import pairing_permutations

    src = ArraySource(arrays) if kind == "array" else StoreSource(
        store_from_arrays(tmp_path / "s", arrays, dtype="float32",
                          splits=["train"] * len(arrays["m0"])))
    models = tuple(arrays)
    n = len(arrays["m0"])
    perms = pairing_permutations(models, n, 3)
    plain = [_rows_of(b, arrays) for b in src.batches(8, 3, 1)]
    assert [len(r[models[0]]) for r in plain] == [8] * (n // 8)
    assert all(r[models[0]] == r[m] for r in plain for m in models)
    paired = [_rows_of(b, arrays) for b in src.batches(8, 3, 1, shuffle_pairing=True)]
    assert paired != plain
    for r in paired:
        base = [int(np.flatnonzero(perms[models[0]] == i)[0]) for i in r[models[0]]]
        for m in models:
            assert r[m] == [int(perms[m][p]) for p in base]
    assert [_rows_of(b, arrays) for b in src.batches(8, 3, 1, 2)] == plain[2:]
    assert [_rows_of(b, arrays) for b in src.batches(8, 3, 1)] == plain  # default: no pairing
    sub = ModelSubset(src, models[1:])
    got = [_rows_of(b, arrays) for b in sub.batches(8, 3, 1, 1, True, (1, 2))]
    want = [_rows_of(b, arrays) for b in src.batches(8, 3, 1, 1, True, (1, 2))]
    assert got == [{m: r[m] for m in models[1:]} for r in want]
    assert sub.n_images() == n and src.n_images() == n and n_batches(src, 100) == 0


def test_store_source_reads_ahead_everything_it_gathers(arrays, tmp_path):
    """Guards the read-ahead: before a batch is gathered, its rows were passed to
    ``Store.prefetch`` (this window and the next), so reads stay ahead of training."""
    store = store_from_arrays(tmp_path / "s", arrays, dtype="float32",
                              splits=["train"] * len(arrays["m0"]))
    src = StoreSource(store, chunk_images=4, buffer_chunks=2)
    hinted: set[int] = set()
    store.prefetch = lambda rows: hinted.update(int(r) for r in rows)
    real = src._gather

    def gather(model, rows):
        assert set(rows.tolist()) <= hinted, "gathered rows that were never prefetched"
        return real(model, rows)

    src._gather = gather
    for epoch in (0, 1):
        hinted.clear()
        assert len(list(src.batches(4, 0, epoch))) == len(arrays["m0"]) // 4
        hinted.clear()
        assert len(list(src.batches(4, 0, epoch, start=5))) == len(arrays["m0"]) // 4 - 5


def test_array_source_shapes_dtypes_stats_and_defaults(make_arrays):
    """Guards ArraySource's contract: float32 (B·tokens, d) batches of B whole images even
    from float64 arrays, statistics equal to a naive computation, mismatched image or token
    counts refused, and ModelSubset's defaults (no pairing, one process) passed through."""
    arrays = {m: a.astype(np.float64) for m, a in make_arrays(n_images=24, tokens=3).items()}
    src = ArraySource(arrays)
    batches = list(src.batches(8, 0, 0))
    assert len(batches) == 3
    for b in batches:
        for m, x in b.items():
            assert x.dtype == torch.float32 and tuple(x.shape) == (8 * 3, arrays[m].shape[2])
    for m, a in arrays.items():
        flat = a.reshape(-1, a.shape[2])
        np.testing.assert_allclose(src.stats()[m].mean_d, flat.mean(0), rtol=1e-12)
        np.testing.assert_allclose(src.stats()[m].std_d, flat.std(0), rtol=1e-9)
    bad = dict(arrays)
    bad["m1"] = bad["m1"][:, :2]
    n, t = arrays["m0"].shape[:2]
    with pytest.raises(UsaeError, match=re.escape(f"model 'm1': shape ({n}, 2) (images, tokens) "
                                                  f"differs from model 'm0' with ({n}, {t})")):
        ArraySource(bad)
    sub = ModelSubset(src, ("m2",))
    for got, want in zip(sub.batches(8, 0, 0), src.batches(8, 0, 0)):
        assert torch.equal(got["m2"], want["m2"])


def test_store_source_defaults_and_paths(tmp_path):
    """Guards StoreSource's defaults (chunks of 64 images, 8 chunks per shuffle buffer: part
    of the pinned data order) and that a store given by its path works like a Store."""
    from usae.data.sources import chunked_order

    n = 600
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    store_from_arrays(path, {"a": rng.normal(size=(n, 1, 2)).astype(np.float32)},
                      dtype="float32", splits=["train"] * n)
    by_path = StoreSource(str(path))
    assert by_path.image_order(4, 1).tolist() == chunked_order(n, 64, 8, 4, 1).tolist()
    assert next(by_path.batches(5, 4, 1))["a"].shape == (5, 2)
