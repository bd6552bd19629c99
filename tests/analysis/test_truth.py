"""usae.analysis.truth's pieces on hand-made cosines and memberships: which features count as
one shared concept, which model-specific ones are detected, the raw-space directions, and the
truth folder's refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from usae.analysis import truth
from usae.config import SAEConfig
from usae.errors import UsaeError
from usae.sae.model import UniversalSAE

MODELS = ["a", "b", "c"]
# features: 0 shared (a, b, c), 1 shared, 2 partial (a, b), 3 specific to b, 4 specific to c
MEMBER = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]], bool)
KIND = np.array([0, 0, 1, 2, 2])


def _cos(values):
    """(F, n) per model from {model: rows}."""
    return {m: np.asarray(values[m], dtype=np.float64) for m in MODELS}


# 3 concepts; concept 0 is feature 0 in every model; feature 1 is concept 1 in a and b but
# concept 2 in c (no single concept); feature 2 is concept 1 in a and b; feature 3 concept 2
COS = _cos({
    "a": [[0.95, 0.1, 0.0], [0.2, 0.95, 0.1], [0.0, 0.91, 0.0], [0, 0, 0], [0, 0, 0]],
    "b": [[0.92, 0.1, 0.0], [0.1, 0.93, 0.2], [0.1, 0.9, 0.0], [0.3, 0.2, 0.96], [0, 0, 0]],
    "c": [[0.99, 0.0, 0.0], [0.0, 0.5, 0.97], [0, 0, 0], [0, 0, 0], [0.2, 0.89, 0.3]],
})


def test_a_feature_counts_as_one_concept_when_one_concept_matches_it_everywhere():
    out = truth._as_one(COS, MEMBER, KIND, MODELS, 0.9)
    assert out == {"shared_as_one": 0.5, "partial_as_one": 1.0}
    assert truth._as_one(COS, MEMBER, KIND, MODELS, 0.92) == {"shared_as_one": 0.5,
                                                            "partial_as_one": 0.0}
    only_shared = np.array([0, 0, 0, 2, 2])
    assert truth._as_one(COS, MEMBER, only_shared, MODELS, 0.9)["partial_as_one"] is None
    assert truth._as_one(COS, MEMBER, np.array([1, 1, 1, 2, 2]), MODELS, 0.9)[
        "shared_as_one"] is None


def test_one_third_rounds_to_four_places():
    kind = np.array([0, 0, 0, 2, 2])
    member = MEMBER.copy()
    member[2] = True  # feature 2 now lives in every model; c's cosine 0: not one concept
    cos = {m: v.copy() for m, v in COS.items()}
    cos["c"][2] = [0.95, 0, 0]  # ... matched by concept 0 in c, not in a and b
    assert truth._as_one(cos, member, kind, MODELS, 0.9)["shared_as_one"] == 0.3333


def test_a_specific_feature_is_detected_by_its_best_concept_owned_by_its_model():
    classes = {"specific": np.array([False, True, True]), "owner": np.array([0, 2, 1])}
    # feature 3 (in b): best concept 2, cosine 0.96, specific, owned by b (1): detected
    # feature 4 (in c): best concept 1, cosine 0.89 < 0.9: not detected
    assert truth._specific_detected(COS, MEMBER, KIND, MODELS, classes, 0.9) == 0.5
    assert truth._specific_detected(COS, MEMBER, KIND, MODELS, classes, 0.85) == 1.0
    wrong_owner = {"specific": classes["specific"], "owner": np.array([0, 2, 0])}
    assert truth._specific_detected(COS, MEMBER, KIND, MODELS, wrong_owner, 0.85) == 0.5
    not_specific = {"specific": np.array([False, True, False]), "owner": classes["owner"]}
    assert truth._specific_detected(COS, MEMBER, KIND, MODELS, not_specific, 0.85) == 0.5
    assert truth._specific_detected(COS, MEMBER, np.array([0, 0, 1, 1, 1]), MODELS, classes,
                                    0.9) is None


def test_cosines_are_atoms_times_directions():
    atoms = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    dirs = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    np.testing.assert_allclose(truth.cosines(atoms, dirs), [[0, 1, 0.6], [0.8, 0.6, 1.0]])
    assert truth.cosines(atoms, dirs).dtype == np.float64


def test_raw_directions_undo_the_standardization():
    sae = UniversalSAE(SAEConfig(models=("a",), dims=(3,), n_concepts=2, k=1))
    with torch.no_grad():
        sae.dictionaries["a"].copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]]))
    sae.set_standardization("a", torch.tensor([5.0, -1.0, 2.0]), torch.tensor([2.0, 1.0, 4.0]))
    dirs = truth.raw_directions(sae, "a")
    raw = sae.unstandardize("a", sae.normalized_dict("a").detach()) - sae.unstandardize(
        "a", torch.zeros(1, 3))
    want = raw.double().numpy() / np.linalg.norm(raw.double().numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(dirs, want, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), [1.0, 1.0])
    assert dirs[0].tolist() == pytest.approx([1.0, 0.0, 0.0])  # a scale alone keeps an axis


def test_matched_correlation_ignores_constant_codes_and_counts_every_true_feature():
    true = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # feature 1 never fires
    learned = np.array([[2.0, 5.0], [0.0, 5.0], [2.0, 5.0], [0.0, 5.0]])
    assert truth.matched_correlation(true, learned) == pytest.approx(0.5)  # (1 + 0) / 2


def test_load_truth_takes_the_folder_or_its_file_and_refuses_others(tmp_path):
    from usae.analysis.synth import TRUTH_FILE, TRUTH_JSON
    from usae.files import atomic_save_safetensors

    (tmp_path / TRUTH_JSON).write_text('{"models": ["a"]}')
    atomic_save_safetensors(tmp_path / TRUTH_FILE, {"kind": torch.zeros(2)})
    for where in (tmp_path, str(tmp_path / TRUTH_FILE)):
        summary, tensors = truth.load_truth(where)
        assert summary == {"models": ["a"]} and list(tensors) == ["kind"]
    with pytest.raises(UsaeError, match="^" + re.escape(
            f"{tmp_path / 'x'} holds no {TRUTH_FILE} — pass the folder `usae synth --out` "
            "wrote") + "$"):
        truth.load_truth(tmp_path / "x")
    assert truth.MATCH_COSINE == 0.9


def test_partial_features_are_scored_when_there_is_no_shared_one():
    # features 0-2 partial: 0 is concept 0 in a, b, c (min 0.92); 1 has no single concept
    # (min 0.5); 2 is concept 1 in a and b (min 0.9, at the threshold)
    assert truth._as_one(COS, MEMBER, np.array([1, 1, 1, 2, 2]), MODELS, 0.9) == \
        {"shared_as_one": None, "partial_as_one": 0.6667}


def test_a_specific_feature_at_exactly_the_match_cosine_is_detected():
    classes = {"specific": np.array([False, True, True]), "owner": np.array([0, 2, 1])}
    # feature 3's best cosine is 0.96, the threshold itself; feature 4's is 0.89
    assert truth._specific_detected(COS, MEMBER, KIND, MODELS, classes, 0.96) == 0.5


def test_the_detected_fraction_rounds_to_four_places():
    """Three specific features, one detected: 1/3 is reported as 0.3333."""
    member = MEMBER.copy()
    member[2] = [True, False, False]  # feature 2 now specific to a: concept 1, owned by c
    classes = {"specific": np.array([False, True, True]), "owner": np.array([0, 2, 1])}
    assert truth._specific_detected(COS, member, np.array([0, 0, 2, 2, 2]), MODELS, classes,
                                    0.9) == 0.3333


def test_matched_correlation_of_a_single_true_feature_is_its_own():
    true = np.array([[1.0], [0.0], [1.0], [0.0]])
    learned = np.array([[0.0, 3.0], [5.0, 0.0], [0.0, 3.0], [5.0, 0.0]])  # both |r| = 1
    assert truth.matched_correlation(true, learned) == pytest.approx(1.0)


def test_a_corrupt_summary_is_named_in_the_error(tmp_path):
    from usae.analysis.synth import TRUTH_FILE, TRUTH_JSON
    from usae.files import atomic_save_safetensors

    (tmp_path / TRUTH_JSON).write_text("{")
    atomic_save_safetensors(tmp_path / TRUTH_FILE, {"kind": torch.zeros(2)})
    with pytest.raises(UsaeError, match="^" + re.escape(f"synth summary {tmp_path / TRUTH_JSON}"
                                                        " is corrupt: ")):
        truth.load_truth(tmp_path)


def _scored(tmp_path, fires, match=None):
    """score_truth on a 2-model SAE (4 concepts) and a store of 3 images x 2 tokens:
    feature 0 shared by a and b, feature 1 specific to b."""
    from usae.store.writer import store_from_arrays

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    sae = UniversalSAE(SAEConfig(models=("a", "b"), dims=(3, 4), n_concepts=4, k=1))
    store = store_from_arrays(tmp_path / "s", {"a": rng.normal(size=(3, 2, 3)),
                                                "b": rng.normal(size=(3, 2, 4))}, "float32")
    atoms = {m: rng.normal(size=(2, d)) for m, d in (("a", 3), ("b", 4))}
    atoms = {m: v / np.linalg.norm(v, axis=1, keepdims=True) for m, v in atoms.items()}
    tensors = {"membership": torch.tensor([[1, 1], [0, 1]]), "kind": torch.tensor([0, 2]),
               "codes": torch.from_numpy(rng.random((6, 2))),
               **{f"atoms.{m}": torch.from_numpy(v) for m, v in atoms.items()}}
    summary = {"models": ["a", "b"], "features": {"shared": 1, "specific": 1}, "tokens": 2}
    classes = {"fires": np.asarray(fires, bool), "specific": np.zeros(4, bool),
               "owner": np.zeros(4, int)}
    best = np.max([truth.cosines(atoms[m], truth.raw_directions(sae, m)).max(0)
                   for m in ("a", "b")], axis=0)  # (n,): each concept's best cosine anywhere
    out = truth.score_truth(sae, store, np.arange(3), (summary, tensors), classes,
                            **({} if match is None else {"match": match(best)}))
    return out, best


def test_a_concept_firing_in_one_model_and_matching_nothing_is_spurious(tmp_path):
    fires = [[True, False, False, False], [False, False, False, False]]  # concept 0, in a
    out, best = _scored(tmp_path, fires)
    assert best[0] < 0.9
    assert out["spurious"] == {"count": 1, "firing": 1, "fraction": 1.0}
    assert out["features"] == {"shared": 1, "specific": 1} and out["match_cosine"] == 0.9
    for m, value in out["recovery"].items():
        assert value == round(value, 4) and 0 < value <= 1, m


def test_a_concept_at_exactly_the_match_cosine_is_not_spurious(tmp_path):
    fires = [[True, False, False, False], [False, False, False, False]]
    out, best = _scored(tmp_path, fires, match=lambda best: float(best[0]))
    assert out["match_cosine"] == float(best[0])
    assert out["spurious"] == {"count": 0, "firing": 1, "fraction": 0.0}


def test_the_mean_mcc_rounds_to_four_places(tmp_path, monkeypatch):
    monkeypatch.setattr(truth, "_mcc", lambda *a: {"a": 0.1235, "b": 0.1236})
    out, _ = _scored(tmp_path, [[False] * 4, [False] * 4])
    assert out["mcc"] == {"a": 0.1235, "b": 0.1236}
    assert out["mcc_mean"] == round((0.1235 + 0.1236) / 2, 4) and len(str(out["mcc_mean"])) == 6
