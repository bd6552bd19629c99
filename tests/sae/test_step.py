"""The fast step must be the reference's maths: checked against naive autograd in fp64."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usae.config import resolve
from usae.sae.fused import reference_aux_codes_
from usae.sae.model import UniversalSAE
from usae.sae.oracles import (
    naive_reference_aux_codes,
    naive_step_loss,
    naive_topk_codes,
    naive_unit_rows,
)
from usae.sae.step import reference_aux_codes, step_loss


def _two_model_sae(seed: int, tokens: int = 20, **settings):
    """(cfg, fp64 SAE, batches) for models a (d=10) and b (d=6), n = 32 and k = 3 unless
    ``settings`` say otherwise; seeded, SAE first, then the batches."""
    torch.manual_seed(seed)
    cfg = resolve(("a", "b"), (10, 6), "paper", {"n_concepts": 32, "k": 3, **settings})
    sae = UniversalSAE(cfg.sae).double()
    xs = {"a": torch.randn(tokens, 10).double(), "b": torch.randn(tokens, 6).double()}
    return cfg, sae, xs


@given(st.integers(2, 40), st.integers(4, 64), st.integers(1, 8), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_aux_selection_equals_full_sort(rows, n, k, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(rows, n, generator=g, dtype=torch.float64) + 0.5
    vals, idx = torch.topk(torch.relu(pre), k, dim=1)
    codes = torch.zeros_like(pre).scatter(1, idx, vals)
    ours = reference_aux_codes(torch.relu(pre), idx)
    torch.testing.assert_close(ours, naive_reference_aux_codes(pre, codes))
    assert ((reference_aux_codes_(torch.relu(pre).scatter(1, idx, 0.0)) > 0).sum(1)
            <= n // 2).all()


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("source", [0, 2])
def test_step_loss_and_gradients_match_naive_reference(criterion, source):
    torch.manual_seed(0)
    models, dims = ("a", "b", "c"), (24, 12, 16)
    cfg = resolve(models, dims, "paper", {"n_concepts": 64, "k": 5, "criterion": criterion})
    base = UniversalSAE(cfg.sae).double()
    xs = {m: torch.randn(60, d, dtype=torch.float64) for m, d in zip(models, dims)}
    ours, naive = copy.deepcopy(base), copy.deepcopy(base)
    loss, out, _ = step_loss(ours, xs, source, cfg)
    loss.backward()
    ref = naive_step_loss(naive, xs, source, criterion)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    src = models[source]
    for p, q in zip(ours.model_parameters(src), naive.model_parameters(src)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    # Paper mode: decoders that will not step get no gradient at all.
    for m in models:
        if m != src:
            assert ours.dictionaries[m].grad is None
            assert all(p.grad is None for p in ours.encoders[m].parameters())


def test_decoder_update_all_gets_every_decoder_gradient():
    torch.manual_seed(0)
    models, dims = ("a", "b"), (10, 6)
    cfg = resolve(models, dims, "paper", {"n_concepts": 32, "k": 3, "decoder_update": "all"})
    base = UniversalSAE(cfg.sae).double()
    xs = {m: torch.randn(30, d, dtype=torch.float64) for m, d in zip(models, dims)}
    ours, naive = copy.deepcopy(base), copy.deepcopy(base)
    step_loss(ours, xs, 1, cfg)[0].backward()
    naive_step_loss(naive, xs, 1).backward()
    for m in models:
        torch.testing.assert_close(ours.dictionaries[m].grad, naive.dictionaries[m].grad)


@pytest.mark.parametrize("aux", ["none", "gao"])
@pytest.mark.parametrize("decoder_update", ["source", "all"])
@pytest.mark.parametrize("encoder", ["mlp_bn_1", "linear"])
def test_aux_none_and_gao_match_the_naive_step_in_loss_and_gradients(aux, decoder_update,
                                                                     encoder):
    """Guards aux=none/gao: the loss and every stepped gradient equal dense autograd, with only
    some concepts dead (AuxK must pick among the dead ones and train their encoder rows)."""
    cfg, base, xs = _two_model_sae(0, tokens=30, aux=aux, decoder_update=decoder_update,
                                   encoder=encoder)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True  # 11 dead concepts
    ours, naive = copy.deepcopy(base), copy.deepcopy(base)
    loss, out, _ = step_loss(ours, xs, 0, cfg, dead if aux == "gao" else None)
    ref = naive_step_loss(naive, xs, 0, aux=aux, dead_c=dead, aux_k=min(4 * 3, 32 // 2))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    for m in ("a", "b") if decoder_update == "all" else ("a",):
        for p, q in zip(ours.model_parameters(m), naive.model_parameters(m)):
            if p.grad is not None or q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    if aux == "gao":
        assert out.aux > 0
        # the AuxK term reaches the encoder rows of dead concepts (sparsify's fused encoder
        # drops this gradient)
        assert ours.encoders["a"].linear.weight.grad[dead].abs().sum() > 0



@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_sparse_linear_step_matches_autograd_with_inactive_rows_and_dead_overlap(criterion):
    """The sparse path (encoder=linear) on data where rows have fewer than k positive
    pre-activations and dead concepts also appear in the TopK selection."""
    torch.manual_seed(3)
    cfg = resolve(("a", "b", "c"), (12, 7, 9), "paper",
                  {"n_concepts": 40, "k": 6, "aux": "gao", "encoder": "linear",
                   "criterion": criterion, "aux_k": 9})
    base = UniversalSAE(cfg.sae).double()
    with torch.no_grad():
        base.encoders["b"].linear.bias.sub_(1.5)  # many rows with < k positives
    xs = {m: torch.randn(50, d, dtype=torch.float64) for m, d in zip(("a", "b", "c"), (12, 7, 9))}
    dead = torch.rand(40) < 0.5
    ours, naive = copy.deepcopy(base), copy.deepcopy(base)
    loss, _, _ = step_loss(ours, xs, 1, cfg, dead)
    ref = naive_step_loss(naive, xs, 1, criterion, aux="gao", dead_c=dead, aux_k=9)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    for p, q in zip(ours.model_parameters("b"), naive.model_parameters("b")):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("encoder", ["linear", "mlp_bn_1"])
@pytest.mark.parametrize("n, k", [(64, 3), (16, 3)])
def test_default_aux_k_is_four_k_capped_at_half_the_concepts(encoder, n, k):
    """Guards AuxK's default size min(4k, n // 2) on both encoder paths: with every concept
    dead and most pre-activations positive, every selected entry counts."""
    cfg, sae, xs = _two_model_sae(5, n_concepts=n, k=k, aux="gao", encoder=encoder)
    with torch.no_grad():
        sae.encoders["a"].linear.bias.add_(2.0)
    dead = torch.ones(n, dtype=torch.bool)
    loss, _, _ = step_loss(copy.deepcopy(sae), xs, 0, cfg, dead)
    expected = min(4 * k, n // 2)
    for aux_k, same in ((expected, True), (expected - 1, False)):
        ref = naive_step_loss(copy.deepcopy(sae), xs, 0, aux="gao", dead_c=dead, aux_k=aux_k)
        assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12) == same, aux_k


@pytest.mark.parametrize("encoder", ["linear", "mlp_bn_1"])
def test_aux_none_ignores_a_dead_mask(encoder):
    """Guards that only aux=gao reads the dead mask: aux=none with one given adds nothing."""
    cfg, sae, xs = _two_model_sae(6, aux="none", encoder=encoder)
    with_mask, out, _ = step_loss(copy.deepcopy(sae), xs, 0, cfg,
                                  torch.ones(32, dtype=torch.bool))
    ref = naive_step_loss(copy.deepcopy(sae), xs, 0, aux="none")
    torch.testing.assert_close(with_mask, ref, rtol=1e-12, atol=1e-12)
    assert out.aux == 0.0


@pytest.mark.parametrize("encoder", ["linear", "mlp_bn_1"])
def test_step_scalars_fired_concepts_and_l0_by_hand(encoder):
    """Guards the step's reported scalars against hand computations: the loss as a float, the
    source index, each decoder's reconstruction term, L0 and the fired mask (a bool mask of the
    concepts with a positive selected value; rows with fewer than k positives select zeros)."""
    torch.manual_seed(7)
    models, dims = ("a", "b"), (10, 6)
    cfg = resolve(models, dims, "paper", {"n_concepts": 32, "k": 4, "aux": "none",
                                          "encoder": encoder, "criterion": "l2"})
    sae = UniversalSAE(cfg.sae).double()
    with torch.no_grad():  # many rows with fewer than k positive pre-activations
        sae.encoders["b"].linear.bias.sub_(1.0)
        if encoder == "mlp_bn_1":
            sae.encoders["b"].norm.bias.sub_(2.0)
    xs = {m: torch.randn(25, d, dtype=torch.float64) for m, d in zip(models, dims)}
    loss, out, fired = step_loss(copy.deepcopy(sae), xs, 1, cfg)
    pre = sae.encoders["b"](xs["b"]).detach()
    codes = naive_topk_codes(pre, 4)
    assert ((pre > 0).sum(1) < 4).any()
    assert fired.dtype == torch.bool and torch.equal(fired, (codes > 0).any(0))
    assert out.l0 == pytest.approx(float((codes > 0).sum(1).double().mean()))
    recon = [float((xs[m] - codes @ naive_unit_rows(sae.dictionaries[m].detach()))
                   .square().mean()) for m in models]
    assert out.recon == pytest.approx(recon, rel=1e-10)
    assert out.loss == float(loss.detach()) and out.source == 1 and out.aux == 0.0


@pytest.mark.parametrize("encoder", ["linear", "mlp_bn_1"])
def test_a_one_model_sae_steps_like_the_naive_reference(encoder):
    """Guards the single-dictionary case (no concatenation)."""
    torch.manual_seed(8)
    cfg = resolve(("a",), (9,), "paper", {"n_concepts": 24, "k": 3, "encoder": encoder})
    sae = UniversalSAE(cfg.sae).double()
    xs = {"a": torch.randn(15, 9, dtype=torch.float64)}
    loss, _, _ = step_loss(copy.deepcopy(sae), xs, 0, cfg)
    torch.testing.assert_close(loss, naive_step_loss(copy.deepcopy(sae), xs, 0))


def test_linear_encoders_take_the_sparse_path(monkeypatch):
    """Guards the dispatch to the sparse step for encoder=linear (the dense path gives the same
    numbers, about twice as slowly), and that normalized encoders do not take it."""
    import usae.sae.step as step_module

    calls = []
    real = step_module.sparse_linear_topk
    monkeypatch.setattr(step_module, "sparse_linear_topk",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for encoder, expected in (("linear", 1), ("mlp_bn_1", 0)):
        calls.clear()
        cfg = resolve(("a",), (8,), "paper", {"n_concepts": 16, "k": 2, "aux": "none",
                                              "encoder": encoder})
        step_loss(UniversalSAE(cfg.sae), {"a": torch.randn(5, 8)}, 0, cfg)
        assert len(calls) == expected, encoder


def test_the_sparse_step_normalizes_with_the_fused_backward_and_decodes_auxk_over_the_dead(
        monkeypatch):
    """Guards two speed choices that give the same numbers: the sparse step (linear encoder,
    aux none or gao) normalizes the stepped dictionaries with the fused backward, while the
    paper's path (aux=reference) and normalized encoders keep autograd's; and AuxK's decode is
    told its support, the dead concepts (sorted), so its gradients can be GEMMs."""
    import usae.sae.step as step_module

    fused_norms, supports = [], []
    real_norm, real_decode = step_module.normalize_rows_sparse_path, \
        step_module.sparse_decode_train
    monkeypatch.setattr(step_module, "normalize_rows_sparse_path",
                        lambda w: fused_norms.append(1) or real_norm(w))

    def decode(values, indices, dict_nd, support=None, order=None):
        supports.append(support)
        return real_decode(values, indices, dict_nd, support, order)

    monkeypatch.setattr(step_module, "sparse_decode_train", decode)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7, 12]] = True
    for aux, encoder, expected in (("gao", "linear", 2), ("none", "linear", 2),
                                   ("reference", "linear", 0), ("gao", "mlp_bn_1", 0)):
        fused_norms.clear()
        supports.clear()
        cfg = resolve(("a", "b"), (8, 6), "paper", {"n_concepts": 16, "k": 2, "aux": aux,
                                                    "encoder": encoder,
                                                    "decoder_update": "all"})
        step_loss(UniversalSAE(cfg.sae), {"a": torch.randn(5, 8), "b": torch.randn(5, 6)}, 0,
                  cfg, dead)
        assert len(fused_norms) == expected, (aux, encoder)
        aux_supports = [s for s in supports if s is not None]
        if (aux, encoder) == ("gao", "linear"):
            assert len(aux_supports) == 2  # one AuxK decode per dictionary
            for s in aux_supports:
                assert s.tolist() == [3, 7, 12]
        else:
            assert not aux_supports


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("encoder", ["linear", "mlp_bn_1"])
def test_the_step_on_cuda_matches_the_cpu(encoder):
    """Guards tensors the step builds itself (the fired mask, index rows) on the data's device."""
    cfg, sae, xs = _two_model_sae(9, aux="gao", encoder=encoder)
    dead = torch.rand(32) < 0.5
    cpu, gpu = copy.deepcopy(sae), copy.deepcopy(sae).cuda()
    loss_c, out_c, fired_c = step_loss(cpu, xs, 0, cfg, dead)
    loss_g, out_g, fired_g = step_loss(gpu, {m: x.cuda() for m, x in xs.items()}, 0, cfg,
                                       dead.cuda())
    loss_c.backward()
    loss_g.backward()
    torch.testing.assert_close(loss_g.cpu(), loss_c)
    assert fired_g.device.type == "cuda" and torch.equal(fired_g.cpu(), fired_c)
    for p, q in zip(cpu.model_parameters("a"), gpu.model_parameters("a")):
        torch.testing.assert_close(q.grad.cpu(), p.grad)


def test_each_set_of_codes_is_sorted_by_concept_once_for_every_dictionary(monkeypatch):
    """Guards the shared ``ConceptOrder``: with three decoders stepped, the codes are sorted by
    concept once for the three dictionaries' gradients, AuxK's codes once more when their
    gradients are sparse products, and the encoder's entries (both kinds) once."""
    from usae.sae import sparse

    sorts = []
    real = sparse._concept_sorted
    monkeypatch.setattr(sparse, "_concept_sorted", lambda *a: sorts.append(a[1].numel()) or
                        real(*a))
    monkeypatch.setattr(sparse, "DENSE_SUPPORT_RATIO", 0)  # AuxK's gradients: sparse products
    models, dims = ("a", "b", "c"), (8, 6, 4)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::2] = True
    for aux, expected in (("none", [10 * 3, 10 * 3]), ("gao", [10 * 3, 10 * 5, 10 * 8])):
        sorts.clear()
        cfg = resolve(models, dims, "paper", {"n_concepts": 32, "k": 3, "aux": aux,
                                              "aux_k": 5, "encoder": "linear",
                                              "decoder_update": "all"})
        sae = UniversalSAE(cfg.sae)
        xs = {m: torch.randn(10, d) for m, d in zip(models, dims)}
        step_loss(sae, xs, 1, cfg, dead)[0].backward()
        assert sorted(sorts) == sorted(expected), aux
        assert all(p.grad is not None for p in sae.dictionaries.parameters())
