"""The fused kernels against plain autograd in fp64 (``usae.sae.fused``)."""

import pytest
import torch

from usae.sae.fused import multi_decode, paired_criterion, topk_reference_aux_decode
from usae.sae.oracles import naive_criterion, naive_reference_aux_codes, naive_topk_codes


def test_topk_backward_when_rows_have_fewer_than_k_positive_preactivations():
    """Guards the ``values > 0`` mask: a row with fewer than k positive pre-activations
    selects zeros, and those zeros must pass no gradient (ReLU's derivative is 0 there)."""
    torch.manual_seed(0)
    n, k = 16, 5
    pre = torch.randn(12, n, dtype=torch.float64) - 1.5  # mostly negative
    pre[0, :] = -1.0
    pre[0, :2] = torch.tensor([0.7, 0.2], dtype=torch.float64)  # 2 positives < k
    pre[1, :] = -0.5  # no positive entry at all
    assert ((pre > 0).sum(1) < k).sum() >= 3
    d1 = torch.randn(n, 3, dtype=torch.float64)
    d2 = torch.randn(n, 4, dtype=torch.float64)
    cat = torch.cat([d1, d2], 1)
    g_vals = torch.randn(12, k, dtype=torch.float64)
    g_aux = torch.randn(12, 7, dtype=torch.float64)

    p1 = pre.clone().requires_grad_()
    c1 = cat.clone().requires_grad_()
    vals, idx, aux_hat = topk_reference_aux_decode(p1, c1, k, [3, 4], [True, True])
    ((vals * g_vals).sum() + (aux_hat * g_aux).sum()).backward()

    p2 = pre.clone().requires_grad_()
    c2 = cat.clone().requires_grad_()
    codes = naive_topk_codes(p2, k)
    aux_codes = naive_reference_aux_codes(p2, codes)
    # the same upstream gradient on the selected values, placed at their indices
    g_dense = torch.zeros(12, n, dtype=torch.float64).scatter(1, idx, g_vals)
    ((codes * g_dense).sum() + ((aux_codes @ c2) * g_aux).sum()).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-10, atol=1e-12)
    assert p1.grad[1].abs().sum() == 0  # a row with no positive entry learns nothing


def test_frozen_dictionaries_get_no_weight_gradient_gemm():
    torch.manual_seed(1)
    pre = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    cat = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    _, _, aux_hat = topk_reference_aux_decode(pre, cat, 3, [3, 4], [False, True])
    aux_hat.sum().backward()
    assert cat.grad[:, :3].abs().sum() == 0 and cat.grad[:, 3:].abs().sum() > 0


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


@pytest.mark.parametrize("squared", [False, True])
def test_paired_criterion_by_default_trains_through_the_residual_and_scales_with_upstream(
        squared):
    """Guards the default ``detach_residual=False`` (the reference's aux term back-propagates
    into x - xh), the upstream gradient multiplying (not dividing) the gradient, gradients for
    whichever inputs need them (x alone here), and the per-model parts carrying none."""
    torch.manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    xh = torch.randn(6, 5, dtype=torch.float64)
    ah = torch.randn(6, 5, dtype=torch.float64)
    total, main, aux = paired_criterion(x, xh, ah, [2, 3], 0.5, squared)
    assert not main.requires_grad and not aux.requires_grad
    (3.0 * total).backward()
    x2 = x.detach().clone().requires_grad_()
    name = "l2" if squared else "l1"
    ref = sum(naive_criterion(name, x2[:, a:b], xh[:, a:b])
              + 0.5 * naive_criterion(name, x2[:, a:b] - xh[:, a:b], ah[:, a:b])
              for a, b in ((0, 2), (2, 5)))
    (3.0 * ref).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_multi_decode_codes_gradient_with_frozen_dictionaries():
    """Guards which input's need is checked: the codes' gradient when no dictionary trains."""
    torch.manual_seed(3)
    a = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    cat = torch.randn(6, 4, dtype=torch.float64)
    multi_decode(a, cat, [4], [False]).square().sum().backward()
    a2 = a.detach().clone().requires_grad_()
    (a2 @ cat).square().sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)


def test_normalize_rows_fused_equals_the_reference_forward_bit_for_bit_and_its_gradient():
    """Guards the sparse step's dictionary normalization: the forward is the reference's
    ``w / (||w|| + eps)`` to the bit (fp32), the gradient autograd's (fp64), a zero row gets
    a zero output and the plain ``g / eps`` gradient, and eps is the one given."""
    from usae.sae.fused import normalize_rows_fused
    from usae.sae.model import normalize_rows

    torch.manual_seed(9)
    w32 = torch.randn(7, 5)
    w32[3] = 0.0
    assert torch.equal(normalize_rows_fused(w32, 1e-8), normalize_rows(w32))
    w = torch.randn(7, 5, dtype=torch.float64) * torch.rand(7, 1, dtype=torch.float64)
    w[3] = 0.0
    g = torch.randn(7, 5, dtype=torch.float64)
    for eps in (1e-8, 0.5):
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        out = normalize_rows_fused(w1, eps)
        ref = w2 / (w2.norm(dim=1, keepdim=True) + eps)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        (out * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(w1.grad, w2.grad)
        torch.testing.assert_close(w1.grad[3], g[3] / eps)


def test_a_rules_zero_padding_stays_in_the_auxiliary_pool():
    """The AuxK pool is relu(pre) minus the codes z, kept to its top n/2 (the reference's
    topk(relu(pre) - z, n // 2)): a slot a rule pads with value 0 removes nothing, so that
    concept stays in the pool. Worked out by hand for one token of 4 concepts."""
    pre = torch.tensor([[3.0, 2.0, 1.0, 0.5]])

    def select(post_nc):  # concept 0 kept, concept 1 in a padding slot (value 0)
        return torch.tensor([[3.0, 0.0]]), torch.tensor([[0, 1]])

    values, indices, aux_hat = topk_reference_aux_decode(pre, torch.eye(4), select, [4],
                                                         [True])
    assert values.tolist() == [[3.0, 0.0]] and indices.tolist() == [[0, 1]]
    # relu(pre) - z = [0, 2, 1, 0.5]; its top n/2 = 2 entries: [0, 2, 1, 0]
    assert aux_hat.tolist() == [[0.0, 2.0, 1.0, 0.0]]
