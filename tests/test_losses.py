"""The fast step must be the reference's maths: checked against naive autograd in fp64."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from usae.config import resolve
from usae.fused import multi_decode, paired_criterion, reference_aux_codes_
from usae.oracles import naive_criterion, naive_reference_aux_codes, naive_step_loss
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


def test_aux_none_and_gao_run_and_differ():
    torch.manual_seed(0)
    cfg = resolve(("a", "b"), (10, 6), "paper", {"n_concepts": 32, "k": 3, "aux": "none"})
    sae = UniversalSAE(cfg.sae).double()
    xs = {"a": torch.randn(30, 10).double(), "b": torch.randn(30, 6).double()}
    l_none = step_loss(sae, xs, 0, cfg)[0]
    torch.testing.assert_close(l_none, naive_step_loss(sae, xs, 0, aux="none"))
    from usae.config import with_train

    gao = with_train(cfg, aux="gao")
    dead = torch.ones(32, dtype=torch.bool)
    l_gao, out, _ = step_loss(sae, xs, 0, gao, dead)
    assert out.aux > 0 and float(l_gao.detach()) > float(l_none.detach())
    l_gao.backward()
    assert sae.dictionaries["a"].grad is not None


def test_multi_decode_gradients():
    torch.manual_seed(0)
    a = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    d1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    d2 = torch.randn(5, 4, dtype=torch.float64)
    cat = torch.cat([d1, d2], 1)
    out = multi_decode(a, cat, [3, 4], [True, False])
    (out.sin().sum()).backward()
    a2, d1b = a.detach().clone().requires_grad_(), d1.detach().clone().requires_grad_()
    (torch.cat([a2 @ d1b, a2 @ d2], 1).sin().sum()).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(d1.grad, d1b.grad)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("detach", [False, True])
def test_paired_criterion_matches_autograd(squared, detach):
    torch.manual_seed(0)
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    xh = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    ah = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    total, main, aux = paired_criterion(x, xh, ah, [3, 4], 0.3, squared, detach)
    total.backward()
    name = "l2" if squared else "l1"
    x2, xh2, ah2 = (t.detach().clone().requires_grad_() for t in (x, xh, ah))
    ref = 0
    for a, b in ((0, 3), (3, 7)):
        r = x2[:, a:b] - xh2[:, a:b]
        ref = ref + naive_criterion(name, x2[:, a:b], xh2[:, a:b]) + 0.3 * naive_criterion(
            name, r.detach() if detach else r, ah2[:, a:b])
    ref.backward()
    torch.testing.assert_close(total, ref)
    for t1, t2 in ((x, x2), (xh, xh2), (ah, ah2)):
        torch.testing.assert_close(t1.grad, t2.grad)
    assert main.shape == (2,) and aux.shape == (2,)
