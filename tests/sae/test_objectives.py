"""The objective seam (``usae.sae.objectives``): each sparsity rule and criterion pinned by an
independent oracle, and a rule that exists only here running through training, resume,
encode/decode, eval and the hub card unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.sae.test_train import _StopAfter
from usae.config import resolve
from usae.data.sources import ArraySource
from usae.errors import UsaeError
from usae.sae import objectives
from usae.sae.model import UniversalSAE, densify
from usae.sae.objectives.batch_topk import SEEN, THRESHOLD
from usae.sae.oracles import naive_batch_topk_codes, naive_step_loss
from usae.sae.step import step_loss
from usae.sae.trainer import Trainer
from usae.sae.training import resolve_run_config, train_from_store
from usae.store.writer import store_from_arrays


def _sae(rule: str, k: int = 1, n: int = 3) -> UniversalSAE:
    cfg = resolve(("a",), (2,), "paper", {"n_concepts": n, "k": k, "sparsity": rule})
    return UniversalSAE(cfg.sae)


def _dense(sae: UniversalSAE, post_nc: torch.Tensor) -> torch.Tensor:
    values_nk, indices_nk = sae.select(post_nc)
    return densify(values_nk, indices_nk, post_nc.shape[1])


def test_batch_topk_keeps_the_k_times_n_largest_of_the_batch_by_hand():
    post = torch.tensor([[5.0, 0.0, 1.0], [4.0, 3.0, 2.0]])
    sae = _sae("batchtopk", k=1).train()
    # k x N = 2 entries of the batch: 5 and 4, one in each row
    assert torch.equal(_dense(sae, post), torch.tensor([[5.0, 0, 0], [4.0, 0, 0]]))
    assert float(getattr(sae, THRESHOLD)) == 4.0 and int(getattr(sae, SEEN)) == 1
    sae = _sae("batchtopk", k=2).train()
    # 4 entries: 5, 4, 3 and 2; the first row keeps one, the second three
    assert torch.equal(_dense(sae, post), torch.tensor([[5.0, 0, 0], [4.0, 3.0, 2.0]]))
    assert float(getattr(sae, THRESHOLD)) == 2.0
    # the next step's smallest kept value moves the threshold by 1 %
    _dense(sae, torch.tensor([[9.0, 8.0, 7.0], [6.0, 0.0, 0.0]]))
    assert float(getattr(sae, THRESHOLD)) == pytest.approx(0.99 * 2.0 + 0.01 * 6.0)


def test_batch_topk_threshold_follows_a_cut_below_one_and_is_an_integer_count():
    sae = _sae("batchtopk", k=1).train()
    _dense(sae, torch.tensor([[0.5, 0.0, 0.2], [0.3, 0.0, 0.0]]))  # k x N = 2: 0.5 and 0.3
    assert float(getattr(sae, THRESHOLD)) == pytest.approx(0.3)
    assert getattr(sae, SEEN).dtype == torch.int64 and int(getattr(sae, SEEN)) == 1
    sae.eval()  # values at the threshold are kept, and those between it and 1
    getattr(sae, THRESHOLD).fill_(0.5)
    assert torch.equal(_dense(sae, torch.tensor([[0.5, 0.7, 0.4]])),
                       torch.tensor([[0.5, 0.7, 0.0]]))


def test_batch_topk_at_inference_keeps_what_passes_the_threshold_one_token_at_a_time():
    sae = _sae("batchtopk", k=2).eval()
    getattr(sae, THRESHOLD).fill_(2.5)
    post = torch.tensor([[5.0, 0.0, 1.0], [4.0, 3.0, 2.0]])
    want = torch.tensor([[5.0, 0, 0], [4.0, 3.0, 0]])
    assert torch.equal(_dense(sae, post), want)
    assert torch.equal(_dense(sae, post[1:]), want[1:]), "a token's code needs no batch"
    assert float(getattr(sae, THRESHOLD)) == 2.5, "inference does not move the threshold"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_topk_equals_a_full_sort_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(17, 40, generator=g, dtype=torch.float64)
    sae = _sae("batchtopk", k=3, n=40).double().train()
    torch.testing.assert_close(_dense(sae, torch.relu(pre)), naive_batch_topk_codes(pre, 3))


def _energy(k: int, fraction: float, n: int = 4) -> UniversalSAE:
    cfg = resolve(("a",), (2,), "paper", {"n_concepts": n, "k": k, "sparsity": "energy",
                                          "energy_fraction": fraction})
    return UniversalSAE(cfg.sae)


def test_energy_keeps_the_fewest_of_the_k_largest_whose_squares_reach_the_fraction_by_hand():
    post = torch.tensor([[3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 1.0, 0.5]])
    # row 0, k=3: squares 16, 9, 1 (sum 26); 0.9 x 26 = 23.4: 16 falls short, 16 + 9 reaches
    # it. Row 2: squares 4, 4, 1 (sum 9); 8.1 needs all three
    want = torch.tensor([[3.0, 0, 4.0, 0], [0, 0, 0, 0], [2.0, 2.0, 1.0, 0]])
    for mode in ("train", "eval"):  # no state: training and inference agree
        sae = getattr(_energy(3, 0.9), mode)()
        assert torch.equal(_dense(sae, post), want)
    # 0.5 x 26 = 13: the largest alone carries 16; row 2 (squares 4, 4, 1; goal 4.5) needs two
    assert torch.equal(_dense(_energy(3, 0.5), post),
                       torch.tensor([[0, 0, 4.0, 0], [0, 0, 0, 0], [2.0, 2.0, 0, 0]]))
    # fraction 1 is TopK: every positive entry of the k largest
    assert torch.equal(_dense(_energy(3, 1.0), post),
                       torch.tensor([[3.0, 0, 4.0, 1.0], [0, 0, 0, 0], [2.0, 2.0, 1.0, 0]]))
    assert torch.equal(_dense(_energy(3, 0.9), post[:1]), want[:1]), "a token needs no batch"
    # reaching the fraction exactly is enough: squares 4, 4 (sum 8), 0.5 x 8 = 4 = the first
    tie = _dense(_energy(3, 0.5), torch.tensor([[2.0, 2.0, 0.0, 0.0]]))
    assert int((tie > 0).sum()) == 1 and float(tie.sum()) == 2.0


def test_a_kernels_k_is_topk_of_that_k_or_a_rules_selection_as_given():
    from usae.sae.objectives.topk import as_selection, topk_codes

    post = torch.tensor([[0.1, 3.0, 2.0, 0.5], [1.0, 0.0, 4.0, 2.0]])
    values_nk, indices_nk = as_selection(2)(post)
    assert torch.equal(densify(values_nk, indices_nk, 4),
                       torch.tensor([[0, 3.0, 2.0, 0], [0, 0, 4.0, 2.0]]))

    def rule(post_nc):
        return topk_codes(post_nc, 1)

    assert as_selection(rule) is rule


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_energy_equals_the_walk_down_each_token_on_random_batches(seed, fraction):
    from usae.sae.oracles import naive_energy_codes

    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(17, 40, generator=g, dtype=torch.float64) * \
        torch.rand(17, 1, generator=g, dtype=torch.float64) * 5
    sae = _energy(6, fraction, n=40).double()
    got = _dense(sae, torch.relu(pre))
    torch.testing.assert_close(got, naive_energy_codes(pre, 6, fraction))
    assert int((got > 0).sum(1).max()) <= 6 and int((got > 0).sum(1).min()) >= 1


def test_energy_fraction_is_checked():
    for bad in (0.0, -0.1):
        with pytest.raises(UsaeError, match="energy_fraction must be above 0"):
            _energy(2, bad)
    with pytest.raises(UsaeError, match="energy_fraction"):
        _energy(2, 1.5)


def test_frozen_models_refuse_a_rule_with_shared_state_and_take_a_stateless_one():
    models, dims = ("a", "b"), (4, 4)
    with pytest.raises(UsaeError, match="batchtopk rule keeps state"):
        resolve(models, dims, "fast", {"sparsity": "batchtopk", "frozen_models": "a"})
    for rule in ("topk", "energy"):
        cfg = resolve(models, dims, "fast", {"sparsity": rule, "frozen_models": "a"})
        assert cfg.train.frozen_models == ("a",)


def _step_vs_naive(settings: dict, naive: dict, source: int = 1) -> None:
    torch.manual_seed(0)
    models, dims = ("a", "b", "c"), (24, 12, 16)
    cfg = resolve(models, dims, "paper", {"n_concepts": 64, "k": 5, **settings})
    base = UniversalSAE(cfg.sae).double().train()
    if cfg.sae.encoder == "linear":
        base.init_encoders_from_dictionaries()
    xs = {m: torch.randn(60, d, dtype=torch.float64) for m, d in zip(models, dims)}
    ours, ref_sae = copy.deepcopy(base), copy.deepcopy(base)
    loss, _, _ = step_loss(ours, xs, source, cfg)
    loss.backward()
    ref = naive_step_loss(ref_sae, xs, source, cfg.train.criterion, aux=cfg.train.aux, **naive)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), ref_sae.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("kernel", [{"aux": "reference"},
                                    {"aux": "none", "encoder": "linear"},
                                    {"aux": "none", "encoder": "mlp_ln_1"}])
def test_batch_topk_step_matches_the_naive_loss_on_every_kernel(kernel):
    _step_vs_naive({"sparsity": "batchtopk", "decoder_update": "all", **kernel},
                   {"rule": "batchtopk"})


@pytest.mark.parametrize("kernel", [{"aux": "reference"},
                                    {"aux": "none", "encoder": "linear"},
                                    {"aux": "none", "encoder": "mlp_ln_1"}])
def test_energy_step_matches_the_naive_loss_on_every_kernel(kernel):
    _step_vs_naive({"sparsity": "energy", "energy_fraction": 0.7, "decoder_update": "all",
                    **kernel}, {"rule": "energy"})


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "energy"])
@pytest.mark.parametrize("kernel", [{"aux": "reference"}, {"aux": "none", "encoder": "linear"}])
def test_matryoshka_loss_is_the_sum_of_the_prefix_losses(rule, kernel):
    _step_vs_naive({"sparsity": rule, "matryoshka": "8,32", "decoder_update": "all",
                    **kernel}, {"rule": rule, "prefixes": (8, 32)})


def test_matryoshka_prefixes_are_checked():
    for bad in ("32,8", "0,8", "8,8"):
        with pytest.raises(UsaeError, match="increasing positive"):
            resolve(("a",), (4,), "paper", {"n_concepts": 64, "matryoshka": bad})
    with pytest.raises(UsaeError, match="smaller than the 64"):
        resolve(("a",), (4,), "paper", {"n_concepts": 64, "matryoshka": "8,64"})
    with pytest.raises(UsaeError, match="sparsity must be one of"):
        resolve(("a",), (4,), "paper", {"sparsity": "nope"})


class NaiveL1:
    """A criterion written with plain autograd: the seam's signature, no fused kernel."""

    def __call__(self, x_nD, xh_nD, ah_nD, widths, aux_coef, detach_residual):
        parts = torch.stack([(x - xh).abs().mean() for x, xh in
                             zip(x_nD.split(widths, 1), xh_nD.split(widths, 1))])
        aux = torch.zeros_like(parts)
        if ah_nD is not None:
            resid = x_nD - xh_nD
            resid = resid.detach() if detach_residual else resid
            aux = torch.stack([(r - a).abs().mean() for r, a in
                               zip(resid.split(widths, 1), ah_nD.split(widths, 1))])
        return parts.sum() + aux_coef * aux.sum(), parts.detach(), aux.detach()


class HalfTopK:
    """A sparsity rule that exists only in the tests: TopK with half the k."""

    def buffers(self, n_concepts):
        return {}

    def select(self, post_nc, k, owner):
        return torch.topk(post_nc, max(1, k // 2), dim=1, sorted=False)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(objectives.SPARSITY, "half_topk", HalfTopK)
    monkeypatch.setitem(objectives.CRITERIA, "naive_l1", NaiveL1)


def test_an_unknown_name_at_the_seam_says_its_kind_and_the_known_names(registered):
    with pytest.raises(KeyError) as info:
        objectives.sparsity_rule("top_k")
    assert info.value.args[0] == ("unknown sparsity rule 'top_k'; known: ['batchtopk', "
                                  "'energy', 'half_topk', 'topk']")
    with pytest.raises(KeyError) as info:
        objectives.criterion("huber")
    assert info.value.args[0] == "unknown criterion 'huber'; known: ['l1', 'l2', 'naive_l1']"
    assert isinstance(objectives.sparsity_rule("half_topk"), HalfTopK)  # a fresh instance
    assert objectives.sparsity_rule("half_topk") is not objectives.sparsity_rule("half_topk")


def test_a_criterion_added_at_the_seam_trains_as_the_fused_one(registered):
    torch.manual_seed(0)
    cfg_fused = resolve(("a", "b"), (10, 6), "paper", {"n_concepts": 32, "k": 3})
    cfg_naive = resolve(("a", "b"), (10, 6), "paper", {"n_concepts": 32, "k": 3,
                                                       "criterion": "naive_l1"})
    base = UniversalSAE(cfg_fused.sae).double()
    xs = {"a": torch.randn(20, 10).double(), "b": torch.randn(20, 6).double()}
    fused, naive = copy.deepcopy(base), copy.deepcopy(base)
    (lf, _, _), (ln, _, _) = step_loss(fused, xs, 0, cfg_fused), step_loss(naive, xs, 0, cfg_naive)
    lf.backward()
    ln.backward()
    torch.testing.assert_close(lf, ln)
    for p, q in zip(fused.parameters(), naive.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


@pytest.fixture
def small_store(tmp_path, make_arrays):
    n = 32
    return store_from_arrays(tmp_path / "store", make_arrays(n_images=n, tokens=4),
                             dtype="float32", splits=["train"] * 24 + ["val"] * 8).path


SETS = ["n_concepts=32", "k=4", "batch_images=4", "log_every=1", "checkpoint_every=3"]


@pytest.mark.parametrize("sets", [{"sparsity": "half_topk"}, {"sparsity": "batchtopk"},
                                  {"sparsity": "energy", "energy_fraction": 0.6},
                                  {"sparsity": "topk", "matryoshka": "8,16"},
                                  {"sparsity": "batchtopk", "matryoshka": "8", "aux": "reference",
                                   "encoder": "mlp_bn_1"},
                                  {"active_set": "global", "cross_coef": 0.5,
                                   "matryoshka": "8"}])
def test_each_rule_trains_and_resumes_bit_identically(registered, make_arrays, tmp_path, sets):
    arrays = make_arrays(n_images=24, tokens=4)
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "fast",
                  {"n_concepts": 32, "k": 4, "batch_images": 4, "max_steps": 10,
                   "log_every": 1, "checkpoint_every": 3, **sets})
    Trainer(cfg, tmp_path / "whole", progress=False).fit(ArraySource(arrays))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "part", progress=False).fit(
            _StopAfter(ArraySource(arrays), 7))
    Trainer(cfg, tmp_path / "part", progress=False).fit(ArraySource(arrays), resume=True)
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    if sets.get("sparsity") == "half_topk":
        assert all(r["l0"] <= 2 for r in rows), "the test rule's k/2 ran in training"
    if sets.get("sparsity") == "energy":
        assert all(1 <= r["l0"] < 4 for r in rows), "fewer than k, by the token"
    if sets.get("sparsity") == "batchtopk":
        assert float(a[THRESHOLD]) > 0 and int(a[SEEN]) == 10
        assert all(r["l0"] == pytest.approx(4) for r in rows), "k x N kept, k on average"


def test_a_rule_added_at_the_seam_works_through_encode_eval_and_the_card(
        registered, small_store, tmp_path):
    from usae.analysis.evaluate import evaluate
    from usae.hub import model_card

    run = tmp_path / "run"
    train_from_store(small_store, run, preset="fast", sets=SETS + ["sparsity=half_topk"],
                     max_steps=6, progress=False)
    sae = UniversalSAE.load(run)
    x = torch.randn(5, sae.dim(sae.models[0]))
    codes = sae.encode(sae.models[0], x)
    assert ((codes > 0).sum(1) <= 2).all(), "encode uses the run's rule"
    assert sae.decode(sae.models[1], codes).shape == (5, sae.dim(sae.models[1]))
    report = evaluate(run, small_store, tmp_path / "eval", plots=False, faithfulness=False)
    assert all(v <= 2 + 1e-6 for v in report["l0"].values())
    card = model_card(run, tmp_path / "eval")
    assert "sparsity rule `half_topk`" in card


GLOBAL_CASES = {
    "linear": {"aux": "none", "encoder": "linear"},
    "layernorm": {"aux": "none", "encoder": "mlp_ln_1"},
    "batchnorm_reference_aux": {"aux": "reference", "encoder": "mlp_bn_1"},
    "linear_auxk": {"aux": "gao", "encoder": "linear"},
    "layernorm_auxk": {"aux": "gao", "encoder": "mlp_ln_1"},
    "linear_batchtopk": {"aux": "none", "encoder": "linear", "sparsity": "batchtopk"},
    "linear_ball": {"aux": "none", "encoder": "linear", "dictionary_norm": "ball"},
    "linear_energy": {"aux": "none", "encoder": "linear", "sparsity": "energy",
                      "energy_fraction": 0.7},
}


@pytest.mark.parametrize("case", sorted(GLOBAL_CASES))
@pytest.mark.parametrize("cross", [0.0, 0.5])
def test_global_topk_step_matches_the_naive_loss(case, cross):
    """Loss, every gradient, the fired concepts and BatchNorm's running statistics (each
    encoder runs once a step) against ``naive_global_step_loss``."""
    from usae.sae.oracles import naive_global_step_loss

    torch.manual_seed(0)
    models, dims = ("a", "b", "c"), (24, 12, 16)
    keys = {"sparsity": "topk", **GLOBAL_CASES[case]}
    cfg = resolve(models, dims, "fast", {"n_concepts": 64, "k": 5, "active_set": "global",
                                         "cross_coef": cross, "aux_k": 6, **keys})
    base = UniversalSAE(cfg.sae).double().train()
    with torch.no_grad():  # rows of both lengths, so that `ball` differs from `unit`
        for m in models:
            base.dictionaries[m].mul_(torch.linspace(0.5, 3.0, 64, dtype=torch.float64)[:, None])
    xs = {m: torch.randn(60, d, dtype=torch.float64) for m, d in zip(models, dims)}
    dead = torch.arange(64) % 3 == 0 if keys["aux"] == "gao" else None
    ours, ref_sae = copy.deepcopy(base), copy.deepcopy(base)
    loss, out, fired = step_loss(ours, xs, 0, cfg, dead)
    loss.backward()
    ref, ref_fired = naive_global_step_loss(ref_sae, xs, "l1", cross,
                                            rule=cfg.sae.sparsity, aux=keys["aux"],
                                            dead_c=dead, aux_k=6)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(fired, ref_fired)
    for (name, p), q in zip(ours.named_parameters(), ref_sae.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    for (name, b), c in zip(ours.named_buffers(), ref_sae.buffers()):
        if not name.startswith("batch_topk"):  # (the rule's own state: tested above)
            torch.testing.assert_close(b, c, msg=name)


def test_ball_dictionaries_in_the_step_match_the_naive_loss():
    """``dictionary_norm=ball`` on the source rule's kernels: rows longer than 1 shrink to
    1, shorter ones stay (the oracle's ``naive_ball_rows``)."""
    for kernel in ({"aux": "reference"}, {"aux": "none", "encoder": "linear"}):
        torch.manual_seed(1)
        models, dims = ("a", "b"), (12, 8)
        cfg = resolve(models, dims, "paper", {"n_concepts": 32, "k": 3, "decoder_update": "all",
                                              "dictionary_norm": "ball", **kernel})
        base = UniversalSAE(cfg.sae).double().train()
        with torch.no_grad():
            for m in models:
                base.dictionaries[m].mul_(torch.linspace(0.3, 3.0, 32,
                                                         dtype=torch.float64)[:, None])
        xs = {m: torch.randn(30, d, dtype=torch.float64) for m, d in zip(models, dims)}
        ours, ref_sae = copy.deepcopy(base), copy.deepcopy(base)
        loss, _, _ = step_loss(ours, xs, 1, cfg)
        loss.backward()
        ref = naive_step_loss(ref_sae, xs, 1, "l1", aux=cfg.train.aux)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        for (name, p), q in zip(ours.named_parameters(), ref_sae.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_global_topk_shares_one_active_set_chosen_from_the_mean_by_hand():
    """Model a's ReLU'd activations (3, 0, 1), b's (0, 2, 1.5): their mean (1.5, 1, 1.25)
    picks concept 0 for k = 1; a's code is 3 there, b's is 0 (so only concept 0 fires)."""
    cfg = resolve(("a", "b"), (3, 3), "fast", {"n_concepts": 3, "k": 1, "active_set": "global",
                                               "aux": "none"})
    sae = UniversalSAE(cfg.sae).train()
    with torch.no_grad():
        for m in ("a", "b"):
            sae.encoders[m].linear.weight.copy_(torch.eye(3))
            sae.encoders[m].linear.bias.zero_()
            sae.dictionaries[m].copy_(torch.eye(3))
    xs = {"a": torch.tensor([[3.0, 0.0, 1.0]]), "b": torch.tensor([[0.0, 2.0, 1.5]])}
    loss, out, fired = step_loss(sae, xs, 0, cfg)
    assert fired.tolist() == [True, False, False]
    # a reconstructs (3, 0, 0): mean |error| 1/3; b reconstructs nothing: (2 + 1.5) / 3
    assert out.recon == pytest.approx([1 / 3, 3.5 / 3])
    assert out.l0 == pytest.approx(0.5)


def test_global_topk_needs_every_model_stepping():
    with pytest.raises(UsaeError, match="decoder_update=all"):
        resolve(("a", "b"), (8, 8), "paper", {"active_set": "global"})
    with pytest.raises(UsaeError, match="cross_coef is for active_set=global"):
        resolve(("a", "b"), (8, 8), "fast", {"cross_coef": 1.0})


def test_a_resume_with_another_config_raises_its_own_error_type(make_arrays, tmp_path):
    """ConfigMismatch (a UsaeError): `usae demo` starts afresh on it, and nothing matches
    error text."""
    from usae.errors import ConfigMismatch

    arrays = make_arrays(n_images=8, tokens=2)
    cfg = resolve(tuple(arrays), tuple(a.shape[2] for a in arrays.values()), "fast",
                  {"n_concepts": 16, "k": 2, "batch_images": 4, "max_steps": 2})
    Trainer(cfg, tmp_path / "r", progress=False).fit(ArraySource(arrays))
    other = resolve(cfg.sae.models, cfg.sae.dims, "fast",
                    {"n_concepts": 16, "k": 3, "batch_images": 4, "max_steps": 2})
    with pytest.raises(ConfigMismatch, match=r"k: 2 -> 3"):
        Trainer(other, tmp_path / "r", progress=False).fit(ArraySource(arrays), resume=True)
    with pytest.raises(ConfigMismatch, match="preset"):
        resolve_run_config(
            cfg.sae.models, cfg.sae.dims, tmp_path / "r", preset="paper", resume=True)
    # the command line's path checks the keys when it reads the checkpoint, before any work
    with pytest.raises(ConfigMismatch, match=r"lr: 0.003 -> 0.1"):
        resolve_run_config(cfg.sae.models, cfg.sae.dims, tmp_path / "r", sets=["lr=0.1"],
                           resume=True)
    again = resolve_run_config(cfg.sae.models, cfg.sae.dims, tmp_path / "r", resume=True,
                               sets=["log_every=3"])  # a resumable key may change
    assert again.train.log_every == 3 and again.sae == cfg.sae


def test_code_matching_adds_the_distance_to_the_frozen_models_codes():
    """`match_coef` (train --extend): the loss grows by coef x the mean squared distance
    between the new model's codes and the mean of the frozen models' codes, written out with
    the rule's codes (the fast preset's energy rule); it applies only when a new model is
    the source."""
    from usae.sae.oracles import naive_rule_codes

    torch.manual_seed(0)
    models, dims = ("a", "b", "c"), (12, 8, 10)
    keys = {"n_concepts": 32, "k": 4, "frozen_models": "a,b"}
    plain = resolve(models, dims, "fast", keys)
    matched = resolve(models, dims, "fast", {**keys, "match_coef": 0.5})
    sae = UniversalSAE(plain.sae).double().train()
    xs = {m: torch.randn(20, d, dtype=torch.float64) for m, d in zip(models, dims)}
    with torch.no_grad():
        codes = {m: naive_rule_codes(plain.sae.sparsity, sae.encoders[m](xs[m]), plain.sae)
                 for m in models}
    want = 0.5 * (codes["c"] - (codes["a"] + codes["b"]) / 2).square().mean()
    base, _, _ = step_loss(copy.deepcopy(sae), xs, 2, plain)
    got, _, _ = step_loss(copy.deepcopy(sae), xs, 2, matched)
    torch.testing.assert_close(got - base, want, rtol=1e-9, atol=1e-12)
    base0, _, _ = step_loss(copy.deepcopy(sae), xs, 0, plain)
    got0, _, _ = step_loss(copy.deepcopy(sae), xs, 0, matched)
    assert got0.item() == base0.item(), "a frozen source is not pulled anywhere"
    with pytest.raises(UsaeError, match="match_coef pulls new models"):
        resolve(models, dims, "fast", {"n_concepts": 32, "match_coef": 0.5})


def test_a_rules_state_is_sized_by_the_concept_count_and_sees_its_sae(monkeypatch):
    """A rule's buffers are made for n concepts (e.g. one threshold per concept) and its
    select receives the SAE that owns them."""
    seen = []

    class PerConcept:
        def buffers(self, n_concepts):
            return {"per_concept_threshold": torch.full((n_concepts,), 0.5)}

        def select(self, post_nc, k, owner):
            seen.append(owner)
            keep = post_nc >= owner.per_concept_threshold
            return torch.topk(post_nc * keep, k, dim=1)

    monkeypatch.setitem(objectives.SPARSITY, "per_concept", PerConcept)
    sae = _sae("per_concept", k=2, n=5)
    assert sae.per_concept_threshold.shape == (5,)
    got = _dense(sae, torch.tensor([[0.4, 0.9, 0.6, 0.0, 0.2]]))
    assert torch.equal(got, torch.tensor([[0.0, 0.9, 0.6, 0.0, 0.0]])) and seen == [sae]
