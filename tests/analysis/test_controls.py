"""Independent-SAE matching (``usae.analysis.controls``): pure functions of dictionaries."""

import numpy as np
import pytest
import torch

from usae.analysis.controls import independent_consistency, match_dictionaries
from usae.config import SAEConfig, resolve
from usae.errors import UsaeError
from usae.files import atomic_write_json
from usae.sae.model import UniversalSAE


def test_hungarian_matching_finds_a_permuted_dictionary():
    torch.manual_seed(0)
    d = torch.randn(30, 8)
    perm = torch.randperm(30)
    cos = match_dictionaries(d, d[perm] * 3)
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)
    rand = match_dictionaries(d, torch.randn(30, 8))
    assert rand.mean() < 0.9


def test_a_copy_matches_fully_and_the_random_control_does_not(tmp_path):
    """Guards the matched/random columns (swapping them must fail)."""
    torch.manual_seed(0)
    cfg = resolve(("a", "b"), (64, 48), "paper", {"n_concepts": 40, "k": 4})
    usae = UniversalSAE(cfg.sae)
    for m, d in zip(("a", "b"), (64, 48)):
        ind = UniversalSAE(SAEConfig(models=(m,), dims=(d,), n_concepts=40, k=4))
        with torch.no_grad():
            ind.dictionaries[m].copy_(usae.dictionaries[m][torch.randperm(40)] * 2.0)
        ind.save(tmp_path / "ind" / m, resolve((m,), (d,), "paper", {"n_concepts": 40, "k": 4}))
    atomic_write_json(tmp_path / "ind" / "independent.json", {"models": ["a", "b"]})
    out = independent_consistency(usae, tmp_path / "ind", threshold=0.5)
    for m in ("a", "b"):
        r = out["models"][m]
        assert r["matched_fraction"] == 1.0 and r["mean_cosine"] == pytest.approx(1.0)
        assert r["random_matched_fraction"] < 0.3 and r["random_mean_cosine"] < 0.6
    assert out["cosine_threshold"] == 0.5
    default = independent_consistency(usae, tmp_path / "ind")  # threshold 0.5, seed 0
    assert default == out == independent_consistency(usae, tmp_path / "ind", seed=0)
    assert independent_consistency(usae, tmp_path / "ind", seed=1) != out  # another control


def test_not_an_independent_run(tmp_path):
    sae = UniversalSAE(SAEConfig(models=("a",), dims=(4,), n_concepts=8, k=2))
    with pytest.raises(UsaeError, match="not an independent run"):
        independent_consistency(sae, tmp_path)


def test_a_cosine_at_exactly_the_threshold_is_not_a_match(tmp_path, monkeypatch):
    """Matched means a cosine above the threshold (the docstring's ``>``), for the dictionary
    and for its random control alike."""
    from usae.analysis import controls

    cfg = resolve(("a",), (4,), "paper", {"n_concepts": 8, "k": 2})
    UniversalSAE(cfg.sae).save(tmp_path / "ind" / "a", cfg)
    atomic_write_json(tmp_path / "ind" / "independent.json", {"models": ["a"]})
    monkeypatch.setattr(controls, "match_dictionaries",
                        lambda u, v: np.array([0.5, 0.7, 0.5, 0.2]))
    out = controls.independent_consistency(UniversalSAE(cfg.sae), tmp_path / "ind", 0.5)
    assert out["models"]["a"] == {"matched_fraction": 0.25, "mean_cosine": 0.475,
                                  "random_matched_fraction": 0.25,
                                  "random_mean_cosine": 0.475}
