"""Data sources and statistics (``usae.sources``, ``usae.stats``) against naive numpy."""

import numpy as np
import pytest
import torch

from usae.errors import UsaeError
from usae.sources import ArraySource, ModelSubset, StoreSource, n_batches
from usae.stats import ModelStats, StatsAccumulator
from usae.store import ModelEntry, Store
from usae.store_writer import StoreWriter, store_from_arrays


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
