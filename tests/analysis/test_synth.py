"""``usae synth`` and the scores against its truth, pinned by independent oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import exactly
from usae.analysis.synth import SynthOptions, feature_layout, generate, sample_codes, synth
from usae.analysis.truth import load_truth, matched_correlation, score_truth
from usae.cli import main
from usae.config import SAEConfig
from usae.errors import UsaeError
from usae.sae.model import UniversalSAE
from usae.store.store import Store

SMALL = SynthOptions(dims="24,16,20", shared=8, partial=4, specific=4, images=60, tokens=4,
                     active=2.0, seed=3)


def test_codes_have_the_structure_asked_for():
    o = SynthOptions(dims="8,8,8", shared=6, partial=3, specific=2, children=2, parents=2,
                     images=50, tokens=40, correlation=0.5, seed=1)
    rng = np.random.default_rng(0)
    kind, member, parent = feature_layout(o, rng)
    assert len(kind) == o.n_features() == 6 + 4 + 3 + 3 * 2
    assert member[kind == 0].all() and (member[kind == 2].sum(1) == 1).all()
    partial = member[kind == 1].sum(1)
    assert ((partial >= 2) & (partial < 3)).all()
    codes = sample_codes(o, parent, 20000, rng)
    assert (codes >= 0).all()
    for child in np.flatnonzero(parent >= 0):  # a child fires only with its parent
        assert not ((codes[:, child] > 0) & (codes[:, parent[child]] == 0)).any()
        assert (codes[:, child] > 0).any()
    roots = np.flatnonzero(parent < 0)
    rate = (codes[:, roots] > 0).mean()
    assert rate == pytest.approx(o.active / len(roots), rel=0.15)


def test_activations_are_codes_through_each_models_atoms():
    arrays, truth = generate(SynthOptions(dims="12,10", shared=3, partial=0, specific=2,
                                          images=20, tokens=3, noise=0.0, mean_shift=1.0))
    codes = truth["codes"]
    for m, x in arrays.items():
        want = codes @ truth[f"atoms.{m}"] + truth[f"mean.{m}"]
        np.testing.assert_allclose(x.reshape(-1, x.shape[-1]), want, rtol=1e-5, atol=1e-5)
        norms = np.linalg.norm(truth[f"atoms.{m}"], axis=1)
        assert set(np.round(norms, 5)) <= {0.0, 1.0}
    assert not np.allclose(truth["mean.synth0"], 0)  # a nonzero mean, as in real activations


def test_synth_writes_a_real_store_and_its_truth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--dims", "12,10,8", "--images", "30",
                 "--tokens", "4", "--shared", "4", "--partial", "2", "--specific", "2"]) == 0
    assert "truth with 12 features" in capsys.readouterr().out
    store = Store(tmp_path / "s" / "store")
    assert store.models == ("synth0", "synth1", "synth2") and store.dims == (12, 10, 8)
    assert store.splits() == {"train", "val"} or set(store.splits()) == {"train", "val"}
    summary, t = load_truth(tmp_path / "s")
    assert summary["features"] == {"shared": 4, "partial": 2, "specific": 6}
    assert t["codes"].shape == (30 * 4, 12)
    x = store.read("synth1", np.arange(3)).numpy().reshape(-1, 10)
    want = t["codes"][:12].numpy() @ t["atoms.synth1"].numpy() + t["mean.synth1"].numpy()
    assert np.abs(x - want).max() < 0.2  # the stored rows are the truth's (plus noise)
    assert main(["synth", "--out", str(tmp_path / "s"), "--dims", "12"]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "s")]) == 2  # a finished store: --force
    assert "already holds a synthetic store — pass --force" in capsys.readouterr().err


def _perfect_sae(truth_dir, dims, n_extra=5, seed=0) -> UniversalSAE:
    """A run whose first F dictionary rows are the true atoms (random rows elsewhere)."""
    summary, t = load_truth(truth_dir)
    f = summary["n_features"]
    cfg = SAEConfig(models=tuple(summary["models"]), dims=tuple(dims), n_concepts=f + n_extra,
                    k=2, encoder="linear")
    sae = UniversalSAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m, d in zip(cfg.models, dims):
            rows = torch.randn(f + n_extra, d, generator=gen)
            atoms = t[f"atoms.{m}"]
            live = atoms.norm(dim=1) > 0
            rows[:f][live] = atoms[live]
            sae.dictionaries[m].copy_(rows)
            sae.set_standardization(m, torch.full((d,), 0.3), torch.full((d,), 2.0))
    return sae


def _classes(sae, member, specific_owner=True):
    n = sae.cfg.n
    f = member.shape[0]
    owner = np.zeros(n, int)
    specific = np.zeros(n, bool)
    for i in range(f):
        if member[i].sum() == 1 and specific_owner:
            owner[i], specific[i] = int(np.flatnonzero(member[i])[0]), True
    return {"specific": specific, "owner": owner, "fires": np.ones((len(sae.models), n))}


def test_a_perfect_dictionary_scores_one(tmp_path):
    synth(tmp_path / "s", SMALL)
    sae = _perfect_sae(tmp_path / "s", SMALL.model_dims())
    store = Store(tmp_path / "s" / "store")
    member = load_truth(tmp_path / "s")[1]["membership"].numpy().astype(bool)
    out = score_truth(sae, store, store.rows("val"), load_truth(tmp_path / "s"),
                      _classes(sae, member))
    assert out["recovery"] == {m: 1.0 for m in sae.models}
    assert out["shared_as_one"] == 1.0 and out["partial_as_one"] == 1.0
    assert out["specific_detected"] == 1.0
    out = score_truth(sae, store, store.rows("val"), load_truth(tmp_path / "s"),
                      _classes(sae, member, specific_owner=False))
    assert out["specific_detected"] == 0.0  # matched, but not classed model-specific
    with pytest.raises(UsaeError, match="is for models"):
        sae2 = UniversalSAE(SAEConfig(models=("a", "b", "c"), dims=(24, 16, 20), n_concepts=8,
                                      k=2))
        score_truth(sae2, store, store.rows("val"), load_truth(tmp_path / "s"),
                    {"specific": np.zeros(8, bool), "owner": np.zeros(8, int),
                     "fires": np.ones((3, 8))})


def test_a_random_dictionary_scores_what_chance_predicts(tmp_path):
    """Recovery of random rows = E[max over n random unit vectors of the cosine with a unit
    vector], estimated here by its own Monte Carlo."""
    synth(tmp_path / "s", SMALL)
    summary, t = load_truth(tmp_path / "s")
    dims = SMALL.model_dims()
    sae = _perfect_sae(tmp_path / "s", dims, n_extra=400, seed=5)  # many rows: low variance
    with torch.no_grad():
        for m, d in zip(sae.models, dims):
            sae.dictionaries[m].copy_(torch.randn(sae.cfg.n, d, generator=torch.Generator()
                                                  .manual_seed(d)))
    store = Store(tmp_path / "s" / "store")
    member = t["membership"].numpy().astype(bool)
    out = score_truth(sae, store, store.rows("val"), load_truth(tmp_path / "s"),
                      _classes(sae, member))
    rng = np.random.default_rng(123)
    for m, d in zip(sae.models, dims):
        trials = rng.normal(size=(500, sae.cfg.n, d))
        trials /= np.linalg.norm(trials, axis=2, keepdims=True)
        chance = float(trials[:, :, 0].max(1).mean())  # cosine with e_0, by symmetry
        assert out["recovery"][m] == pytest.approx(chance, abs=0.04), (m, chance)
    assert out["shared_as_one"] == 0.0


def test_matched_correlation():
    rng = np.random.default_rng(0)
    true = rng.exponential(size=(500, 6)) * (rng.random((500, 6)) < 0.3)
    assert matched_correlation(true, true) == pytest.approx(1.0)
    learned = np.concatenate([true[:, ::-1] * 3.0, np.zeros((500, 4))], axis=1)
    assert matched_correlation(true, learned) == pytest.approx(1.0)  # order and scale free
    noise = rng.normal(size=(500, 10))
    assert matched_correlation(true, noise) < 0.2


def test_a_short_run_recovers_the_shared_features_as_single_concepts(tmp_path, capsys):
    """Seeded CPU run on a small set with a nonzero mean (threshold from measurement, with
    margin: docs/RESULTS.md)."""
    o = SynthOptions(dims="24,16,20", shared=10, partial=0, specific=3, images=600, tokens=8,
                     active=1.5, seed=0)
    synth(tmp_path / "s", o)
    assert main(["train", "--store", str(tmp_path / "s" / "store"), "--out",
                 str(tmp_path / "run"), "--preset", "fast", "--no-progress",
                 "--n-concepts", "64", "--k", "4", "--batch-images", "8"]) == 0
    assert main(["eval", str(tmp_path / "run"), "--store", str(tmp_path / "s" / "store"),
                 "--out", str(tmp_path / "ev"), "--no-plots", "--truth",
                 str(tmp_path / "s")]) == 0
    assert "against the truth" in capsys.readouterr().out
    t = json.loads((tmp_path / "ev" / "report.json").read_text())["truth"]
    # `fast` as it is (energy rule, its 2500 steps): measured 0.93-0.97 recovery and 0.80
    # shared as one (2026-11-29); TopK at 25 epochs gave 0.90-0.97 and 0.50, and the scalar
    # standardization of the first `fast` 0.52 and 0.0
    assert min(t["recovery"].values()) >= 0.88, t
    assert t["shared_as_one"] >= 0.6, t


def test_ball_dictionary_rows_are_at_most_unit_and_short_rows_are_kept():
    from usae.sae.model import ball_rows

    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = ball_rows(w)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    with pytest.raises(UsaeError, match="dictionary_norm must be one of"):
        SAEConfig(models=("a",), dims=(4,), dictionary_norm="sphere")


def test_a_ball_run_trains_saves_and_reloads_with_its_norm(arrays, tmp_path):
    from usae.config import resolve
    from usae.data.sources import ArraySource
    from usae.sae.training import train_run

    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "fast",
                  {"n_concepts": 16, "k": 3, "batch_images": 8, "max_steps": 30,
                   "dictionary_norm": "ball"})
    train_run(cfg, ArraySource(arrays), tmp_path / "r", progress=False)
    sae = UniversalSAE.load(tmp_path / "r")
    assert sae.cfg.dictionary_norm == "ball"
    for m in sae.models:
        norms = sae.normalized_dict(m).detach().norm(dim=1)
        assert float(norms.max()) <= 1.0 + 1e-6 and float(norms.min()) < 0.999
        raw = sae.dictionaries[m].detach().norm(dim=1)
        torch.testing.assert_close(norms, raw.clamp_max(1.0))


def test_the_truth_section_has_every_key_rounded_and_counts_spurious_concepts(tmp_path):
    """With the true atoms as the first F rows and 5 random rows after them: recovery 1 in
    every model, the random rows that fire are the spurious ones (none reaches 0.9), and the
    codes' matched correlation is that of an encoder fitted to nothing (checked as rounded)."""
    synth(tmp_path / "s", SMALL)
    sae = _perfect_sae(tmp_path / "s", SMALL.model_dims(), n_extra=5, seed=2)
    store = Store(tmp_path / "s" / "store")
    summary, t = load_truth(tmp_path / "s")
    member = t["membership"].numpy().astype(bool)
    classes = _classes(sae, member)
    n, f = sae.cfg.n, member.shape[0]
    classes["fires"] = np.zeros((3, n))
    classes["fires"][1, [0, f, f + 2]] = 4  # a true feature and two random rows fire
    classes["fires"][2, f + 2] = 1
    out = score_truth(sae, store, store.rows("val"), (summary, t), classes, match=0.9)
    assert sorted(out) == ["features", "match_cosine", "mcc", "mcc_mean", "partial_as_one",
                           "recovery", "shared_as_one", "specific_detected", "spurious"]
    assert out["match_cosine"] == 0.9 and out["features"] == summary["features"]
    assert out["recovery"] == {m: 1.0 for m in sae.models}
    assert out["spurious"] == {"count": 2, "firing": 3, "fraction": 0.6667}
    assert set(out["mcc"]) == set(sae.models)
    for value in out["mcc"].values():
        assert 0 <= value <= 1 and value == round(value, 4)
    assert out["mcc_mean"] == round(float(np.mean(list(out["mcc"].values()))), 4)
    classes["fires"][:] = 0
    none = score_truth(sae, store, store.rows("val"), (summary, t), classes)["spurious"]
    assert none == {"count": 0, "firing": 0, "fraction": 0.0}


def test_mcc_reads_the_codes_of_exactly_the_evaluated_tokens(tmp_path):
    """A learned code equal to the true codes of the evaluated rows correlates 1 with each
    feature that fires there (a feature silent on these rows has no correlation: 0)."""
    from usae.analysis import truth as truth_module

    synth(tmp_path / "s", SMALL)
    summary, t = load_truth(tmp_path / "s")
    store = Store(tmp_path / "s" / "store")
    rows = store.rows("val")[::-1]  # any order: the rows are sorted first
    codes = t["codes"].numpy()
    member = t["membership"].numpy().astype(bool)
    tokens = int(summary["tokens"])

    class Echo:
        models = tuple(summary["models"])

        def encode(self, m, x):
            idx = np.sort(rows)[:, None] * tokens + np.arange(tokens)[None, :]
            return torch.from_numpy(codes[idx.reshape(-1)][:, member[:, self.models.index(m)]])

    got = truth_module._mcc(Echo(), store, rows, codes, member, list(Echo.models), tokens)
    idx = (np.sort(rows)[:, None] * tokens + np.arange(tokens)[None, :]).reshape(-1)
    for j, m in enumerate(Echo.models):
        fires_here = float((codes[idx][:, member[:, j]].std(0) > 0).mean())
        assert got[m] == round(fires_here, 4)
    assert min(got.values()) > 0.5


def test_synth_writes_its_options_a_seeded_split_and_says_what_it_made(tmp_path, caplog):
    with caplog.at_level("INFO", logger="usae.analysis.synth"):
        summary = synth(tmp_path / "s", SMALL)
    assert json.loads((tmp_path / "s" / "truth.json").read_text())["options"] == \
        SMALL.to_json()
    store = Store(tmp_path / "s" / "store")
    assert store.dtype == "float32"
    images = store.manifest["images"]
    assert [i["path"] for i in images] == [f"synth/{i}" for i in range(SMALL.images)]
    n_val = int(round(SMALL.images * SMALL.val_fraction))
    held = set(np.random.default_rng([SMALL.seed, 7]).permutation(SMALL.images)[:n_val]
               .tolist())
    assert [i["split"] for i in images] == ["val" if k in held else "train"
                                            for k in range(SMALL.images)]
    assert caplog.messages[-1] == (
        f"synthetic store: 3 models, {summary['n_features']} features ("
        + ", ".join(f"{k} {v}" for k, v in summary["features"].items()) + ")")


def test_synth_replaces_only_its_own_folder_unless_forced(tmp_path):
    tiny = SynthOptions(dims="8,6", shared=2, partial=0, specific=1, images=10, tokens=2)
    synth(tmp_path / "s", tiny)
    with pytest.raises(UsaeError, match="already holds a synthetic store — pass --force"):
        synth(tmp_path / "s", tiny)
    synth(tmp_path / "s", tiny, force=True)  # its own folder, forced: written again
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("")
    with pytest.raises(UsaeError) as info:
        synth(tmp_path / "o", tiny)
    assert str(info.value) == (f"{tmp_path / 'o'} is not empty and is not a usae synth folder "
                               "— pass --force to replace it, or choose another --out")
    synth(tmp_path / "o", tiny, force=True)
    assert not (tmp_path / "o" / "mine.txt").exists()


# --- the generator's structure, each part against the rule the module's docstring states ---

def _all_firing(magnitude: str, n_tokens: int = 20000) -> np.ndarray:
    """Magnitudes alone: 4 root features and an `active` above 4, so every feature fires at
    every token (p = 1) and each code is its magnitude."""
    o = SynthOptions(dims="4,4", shared=4, partial=0, specific=0, active=10.0,
                     magnitude=magnitude)
    codes = sample_codes(o, np.full(4, -1), n_tokens, np.random.default_rng(5))
    assert codes.dtype == np.float32 and codes.shape == (n_tokens, 4)
    assert (codes > 0).all()
    return codes.ravel().astype(np.float64)


def test_magnitudes_follow_the_distribution_named():
    exp = _all_firing("exponential")  # mean 1 and std 1, down to 0
    assert exp.mean() == pytest.approx(1.0, abs=0.02)
    assert exp.std() == pytest.approx(1.0, abs=0.03)
    assert exp.min() < 0.01 and len(np.unique(exp)) > 0.99 * len(exp)  # float32: a few ties
    log_normal = np.log(_all_firing("lognormal"))  # median 1, sigma 0.5
    assert np.median(log_normal) == pytest.approx(0.0, abs=0.01)
    assert log_normal.std() == pytest.approx(0.5, abs=0.01)
    uniform = _all_firing("uniform")  # 0.5 to 1.5
    assert 0.5 <= uniform.min() < 0.501 and 1.499 < uniform.max() < 1.5
    assert uniform.mean() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("correlation", [0.0, 0.5])
@pytest.mark.parametrize("active", [1.0, 20.0])  # p = 1/8, and p = 1 (capped)
def test_a_root_fires_by_its_own_draw_or_its_groups(correlation, active):
    # own draw with probability p(1-c), or its group's (probability p) joined with
    # probability c: P(fire) = 1 - (1 - p(1-c)) (1 - p c)
    o = SynthOptions(dims="4,4", shared=8, partial=0, specific=0, active=active,
                     correlation=correlation)
    codes = sample_codes(o, np.full(8, -1), 40000, np.random.default_rng(2))
    p = min(1.0, active / 8)
    want = 1 - (1 - p * (1 - correlation)) * (1 - p * correlation)
    assert (codes > 0).mean() == pytest.approx(want, abs=0.01)


def test_one_root_feature_fires_with_probability_active():
    o = SynthOptions(dims="4,4", shared=1, partial=0, specific=0, active=0.5)
    codes = sample_codes(o, np.array([-1]), 40000, np.random.default_rng(3))
    assert (codes > 0).mean() == pytest.approx(0.5, abs=0.01)


def test_full_correlation_fires_groups_of_four_together():
    o = SynthOptions(dims="4,4", shared=12, partial=0, specific=0, active=3.0, correlation=1.0)
    fires = sample_codes(o, np.full(12, -1), 4000, np.random.default_rng(4)) > 0
    for g in range(3):  # features 4g .. 4g+3 fire at the same tokens, about a quarter of them
        block = fires[:, 4 * g:4 * g + 4]
        assert (block == block[:, :1]).all()
        assert block[:, 0].mean() == pytest.approx(0.25, abs=0.03)
    assert not (fires[:, 0] == fires[:, 4]).all() and not (fires[:, 4] == fires[:, 8]).all()


def test_a_child_fires_with_half_of_its_parents_firings():
    o = SynthOptions(dims="4,4", shared=2, partial=0, specific=0, children=1, parents=2,
                     active=1.0)
    parent = np.array([-1, -1, 0, 1])
    fires = sample_codes(o, parent, 40000, np.random.default_rng(6)) > 0
    for child, par in ((2, 0), (3, 1)):
        assert fires[:, par].mean() == pytest.approx(0.5, abs=0.01)  # p = active / 2 roots
        assert fires[fires[:, par], child].mean() == pytest.approx(0.5, abs=0.015)
        assert not fires[~fires[:, par], child].any()


def test_the_layout_lists_shared_children_partial_then_each_models_specific():
    o = SynthOptions(dims="4,4,4,4,4", shared=2, children=2, parents=1, partial=300,
                     specific=1)
    kind, member, parent = feature_layout(o, np.random.default_rng(0))
    assert (kind.dtype, member.dtype, parent.dtype) == (np.int8, np.bool_, np.int64)
    assert len(kind) == o.n_features() == 2 + 2 + 300 + 5
    assert kind.tolist() == [0] * 4 + [1] * 300 + [2] * 5
    assert parent.tolist() == [-1, -1, 0, 0] + [-1] * 305  # -1: no parent
    assert member[:4].all()
    sizes = member[4:304].sum(1)  # at least two models, never all five, every size drawn
    assert set(sizes.tolist()) == {2, 3, 4}
    np.testing.assert_array_equal(member[304:], np.eye(5, dtype=bool))


def test_two_models_have_no_partial_features():
    o = SynthOptions(dims="6,6", shared=3, partial=5, specific=2)
    kind, member, parent = feature_layout(o, np.random.default_rng(0))
    assert o.n_features() == len(kind) == 3 + 2 * 2
    assert kind.tolist() == [0, 0, 0, 2, 2, 2, 2] and (parent == -1).all()
    no_children = SynthOptions(dims="6,6,6", shared=3, partial=2, specific=1, parents=2)
    assert no_children.n_children() == 0
    assert no_children.n_features() == len(feature_layout(no_children,
                                                           np.random.default_rng(0))[0]) == 8


def test_option_bounds_are_inclusive_where_documented():
    SynthOptions(dims="2,2", shared=1, partial=0, specific=0)  # width 2, one feature
    SynthOptions(dims="4,4", shared=3, children=1, parents=3)  # parents == shared
    with exactly("--dims must be at least 2 each, got '1,2'"):
        SynthOptions(dims="1,2")
    with exactly("--dims needs at least two models, e.g. 64,48,56"):
        SynthOptions(dims="8")
    with exactly("--parents 4 is more than --shared 3"):
        SynthOptions(dims="4,4", shared=3, children=1, parents=4)
    with exactly("no features: give --shared, --partial or --specific"):
        SynthOptions(dims="4,4", shared=0, partial=0, specific=0)


MEASURED = SynthOptions(dims="40,24", shared=6, partial=0, specific=3, images=200, tokens=10,
                        active=3.0, mean_shift=1.5, noise=0.5, seed=9)


def test_generate_is_seeded_and_typed():
    arrays, truth = generate(MEASURED)
    again, truth_again = generate(MEASURED)
    other, _ = generate(SynthOptions(**{**MEASURED.to_json(), "seed": 10}))
    for m in arrays:
        np.testing.assert_array_equal(arrays[m], again[m])
        assert not np.allclose(arrays[m], other[m])
    assert sorted(truth) == sorted(["kind", "membership", "parent", "codes"] + [
        f"{k}.{m}" for k in ("atoms", "mean") for m in ("synth0", "synth1")])
    assert all(np.array_equal(truth[k], truth_again[k]) for k in truth)
    assert {m: (a.shape, a.dtype) for m, a in arrays.items()} == {
        "synth0": ((200, 10, 40), np.float32), "synth1": ((200, 10, 24), np.float32)}
    assert (truth["kind"].dtype, truth["membership"].dtype, truth["parent"].dtype,
            truth["codes"].dtype) == (np.int8, np.uint8, np.int64, np.float32)
    assert truth["mean.synth0"].shape == (40,) and truth["mean.synth0"].dtype == np.float32
    assert truth["atoms.synth1"].shape == (12, 24) and truth["atoms.synth1"].dtype == np.float32


def test_the_mean_and_the_noise_scale_with_the_signals_rms():
    arrays, truth = generate(MEASURED)
    for m, x in arrays.items():
        d = x.shape[-1]
        signal = truth["codes"].astype(np.float64) @ truth[f"atoms.{m}"]
        rms = np.sqrt((signal ** 2).mean())
        mean = truth[f"mean.{m}"].astype(np.float64)
        # norm = mean_shift x rms per dimension x sqrt(d)
        assert np.linalg.norm(mean) == pytest.approx(MEASURED.mean_shift * rms * np.sqrt(d),
                                                     rel=1e-5)
        noise = x.reshape(-1, d) - signal - mean  # (tokens, d), fresh at every token
        assert noise.std() == pytest.approx(MEASURED.noise * rms, rel=0.02)
        assert noise.std(axis=0).min() > 0.8 * MEASURED.noise * rms
        assert abs(noise.mean()) < 0.01 * rms
        assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.05


def test_a_model_with_no_signal_takes_unit_rms():
    # tiny and sparse: find a seed where no feature fires at all; the mean's norm is then
    # mean_shift x 1 x sqrt(d)
    for seed in range(60):
        o = SynthOptions(dims="4,9", shared=1, partial=0, specific=0, images=10, tokens=1,
                         active=0.1, noise=0.0, mean_shift=2.0, seed=seed)
        arrays, truth = generate(o)
        if not truth["codes"].any():
            break
    else:
        pytest.fail("no seed without firing")
    for m, d in (("synth0", 4), ("synth1", 9)):
        assert np.linalg.norm(truth[f"mean.{m}"]) == pytest.approx(2.0 * np.sqrt(d), rel=1e-5)
        np.testing.assert_allclose(arrays[m].reshape(-1, d), np.tile(truth[f"mean.{m}"], (10, 1)))
