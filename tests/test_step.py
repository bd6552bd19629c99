"""The fast step must be the reference's maths: checked against naive autograd in fp64."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usae.config import resolve
from usae.fused import reference_aux_codes_
from usae.oracles import naive_reference_aux_codes, naive_step_loss
from usae.sae import UniversalSAE
from usae.step import reference_aux_codes, step_loss


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
    torch.manual_seed(0)
    cfg = resolve(("a", "b"), (10, 6), "paper", {"n_concepts": 32, "k": 3, "aux": aux,
                                                 "decoder_update": decoder_update,
                                                 "encoder": encoder})
    base = UniversalSAE(cfg.sae).double()
    xs = {"a": torch.randn(30, 10).double(), "b": torch.randn(30, 6).double()}
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
