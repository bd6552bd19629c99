"""Streaming R² (``usae.analysis.metrics``) against the whole-split formulas written out in numpy."""

import numpy as np
import torch

from usae.analysis.metrics import R2Accumulator, cross_model_update, r2_matrix
from usae.config import SAEConfig
from usae.sae.model import UniversalSAE


def test_streamed_r2_equals_the_whole_split_formulas():
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(2, 3, size=(90, 4)), "b": rng.normal(-1, 1, size=(90, 3))}
    xhat = {k: v + rng.normal(0, 0.5, size=v.shape) for k, v in x.items()}
    acc = R2Accumulator(("a", "b"), (4, 3))
    for part in np.array_split(np.arange(90), 4):
        acc.update_targets({k: torch.from_numpy(v[part]) for k, v in x.items()})
        for i in range(2):
            for j, m in enumerate(("a", "b")):
                acc.update_error(i, j, torch.from_numpy(x[m][part]),
                                 torch.from_numpy(xhat[m][part] * (1 + i)))
    for i in range(2):
        for j, m in enumerate(("a", "b")):
            err = ((x[m] - xhat[m] * (1 + i)) ** 2).sum()
            per_dim = 1 - err / ((x[m] - x[m].mean(0)) ** 2).sum()
            scalar = 1 - (((x[m] - xhat[m] * (1 + i)) ** 2).mean()
                          / ((x[m] - x[m].mean()) ** 2).mean())
            assert abs(acc.r2()[i, j] - per_dim) < 1e-10
            assert abs(acc.r2_paper()[i, j] - scalar) < 1e-10
            assert abs(acc.mse()[i, j] - err / x[m].size) < 1e-10


def test_cross_model_update_decodes_every_pair_in_raw_space():
    torch.manual_seed(0)
    sae = UniversalSAE(SAEConfig(models=("a", "b"), dims=(5, 3), n_concepts=12, k=4,
                                 encoder="linear")).double().eval()
    sae.set_standardization("a", torch.full((5,), 1.0), torch.full((5,), 2.0))
    raw = {"a": torch.randn(20, 5).double(), "b": torch.randn(20, 3).double()}
    dicts = {m: sae.normalized_dict(m) for m in sae.models}
    acc = R2Accumulator(sae.models, (5, 3))
    with torch.no_grad():
        codes = cross_model_update(acc, sae, raw, dicts)
    for i, mi in enumerate(sae.models):
        dense = sae.encode(mi, raw[mi].float()).double()
        vals, idx = codes[mi]
        torch.testing.assert_close(torch.zeros(20, 12).double().scatter(1, idx, vals), dense,
                                   rtol=1e-5, atol=1e-6)
        for j, mj in enumerate(sae.models):
            w = sae.dictionaries[mj].detach()
            xhat = dense @ (w / (w.norm(dim=1, keepdim=True) + 1e-8))
            xhat = xhat * getattr(sae, f"scale_{mj}") + getattr(sae, f"mean_{mj}")
            assert abs(acc.sse[i, j] - float(((raw[mj] - xhat) ** 2).sum())) < 1e-4


def test_r2_matrix_restores_training_mode():
    sae = UniversalSAE(SAEConfig(models=("a",), dims=(4,), n_concepts=8, k=2))
    sae.train()
    r2_matrix(sae, [{"a": torch.randn(16, 4)}])
    assert sae.training


def test_r2_for_small_variance_and_a_single_token():
    """Guards the tiny floor under the total sum of squares (data with variance far below 1
    must not be clamped) and the token count in the formulas down to one token (scalar-mean
    R² and MSE are defined there; per-dimension R² is not, its SST is 0)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.01, size=(40, 3))
    xhat = x + rng.normal(0, 0.002, size=x.shape)
    acc = R2Accumulator(("a",), (3,))
    acc.update_targets({"a": torch.from_numpy(x)})
    acc.update_error(0, 0, torch.from_numpy(x), torch.from_numpy(xhat))
    expected = 1 - ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(acc.r2()[0, 0] - expected) < 1e-10 and 0.5 < expected < 1
    one = np.array([[1.0, 2.0, 6.0]])
    acc = R2Accumulator(("a",), (3,))
    acc.update_targets({"a": torch.from_numpy(one)})
    acc.update_error(0, 0, torch.from_numpy(one), torch.zeros(1, 3, dtype=torch.float64))
    assert abs(acc.r2_paper()[0, 0] - (1 - 41 / 14)) < 1e-12  # SST about the mean 3: 4+1+9
    assert abs(acc.mse()[0, 0] - 41 / 3) < 1e-12


def test_jaccard_of_active_sets_by_hand():
    """Token 0: {1,2,3} vs {2,3,4} -> 2/4; token 1: {5} vs {} -> 0; token 2: both empty, not
    counted. Zero values are not active even when TopK selected them."""
    from usae.analysis.metrics import JaccardAccumulator

    idx_a = torch.tensor([[1, 2, 3], [5, 6, 7], [1, 2, 3]])
    val_a = torch.tensor([[1.0, 2.0, 0.5], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    idx_b = torch.tensor([[4, 3, 2], [5, 6, 7], [1, 2, 3]])
    val_b = torch.tensor([[0.2, 0.1, 0.9], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    acc = JaccardAccumulator(("a", "b"))
    acc.update({"a": (val_a, idx_a), "b": (val_b, idx_b)})
    assert acc.result() == [[1.0, 0.25], [0.25, 1.0]]
    acc.update({"a": (val_a[:1], idx_a[:1]), "b": (val_a[:1], idx_a[:1])})  # identical: 1
    assert acc.result()[0][1] == round((0.5 + 0 + 1) / 3, 5)
    empty = JaccardAccumulator(("a", "b"))
    empty.update({"a": (val_a[2:], idx_a[2:]), "b": (val_b[2:], idx_b[2:])})
    assert empty.result() == [[None, None], [None, None]]


def test_jaccard_over_ten_thousand_batches_averages_without_drift():
    """An ImageNet-sized eval is tens of thousands of batches: the running sums must not drift
    (in float32 they reach 0.33331 here). Each token: A = {0, 1}, B = {1, 2}: 1/3."""
    from usae.analysis.metrics import JaccardAccumulator

    acc = JaccardAccumulator(("a", "b"))
    codes = {"a": (torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]])),
             "b": (torch.tensor([[3.0, 4.0]]), torch.tensor([[1, 2]]))}
    for _ in range(10_000):
        acc.update(codes)
    assert acc.result() == [[1.0, 0.33333], [0.33333, 1.0]]  # 1/3 to 5 decimals


def test_jaccard_counts_stay_exact_past_two_to_the_24_tokens():
    """At ImageNet scale (1.28 M images x 49 tokens = 63 M tokens) the token counts pass 2^24,
    where float32 stops counting by ones: one more token must still count as one."""
    from usae.analysis.metrics import JaccardAccumulator

    acc = JaccardAccumulator(("a", "b"))
    acc.counts += 2 ** 24  # as after 2^24 tokens
    one = (torch.tensor([[1.0]]), torch.tensor([[3]]))
    acc.update({"a": one, "b": one})
    assert acc.counts[0, 1].item() == 2 ** 24 + 1 and acc.counts[0, 0].item() == 2 ** 24 + 1
