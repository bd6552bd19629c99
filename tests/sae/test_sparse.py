"""The sparse step's kernels against plain autograd in fp64 (``usae.sae.sparse``)."""

import pytest
import torch

from usae.sae import sparse
from usae.sae.oracles import naive_topk_codes
from usae.sae.sparse import sparse_decode_train, sparse_linear_topk, support_is_dense

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _naive_linear_topk(x, w, b, k, dead, aux_k):
    """Dense codes of TopK(ReLU(x W^T + b)) and of AuxK among the dead concepts."""
    post = torch.relu(x @ w.T + b)
    codes = naive_topk_codes(x @ w.T + b, k)
    masked = post * dead
    aux = torch.zeros_like(post)
    if aux_k:
        v, i = masked.topk(aux_k, dim=1)
        aux = aux.scatter(1, i, v)
    return codes, aux


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", ["xwb", "w", "b", "x"])
@pytest.mark.parametrize("use_aux", [True, False])
@pytest.mark.parametrize("dense_ratio,gemm", [(0, ()), (10**6, ()), (10**6, ("cpu", "cuda")),
                                              (0, ("cpu", "cuda"))],
                         ids=["sparse-aux", "dense-aux", "dense-aux-gemm-input-grad",
                              "sparse-aux-gemm-device"])
def test_sparse_linear_topk_gradients_match_dense_autograd(needs, use_aux, device, dense_ratio,
                                                          gemm, monkeypatch):
    """Guards the sparse encoder step: values, AuxK among dead concepts (their gradient goes
    into the encoder, as a sparse product or as a GEMM over the dead columns, and into the
    input by embedding_bag or, where ``support_gemm_on``, that GEMM), each input's gradient
    computed when that input needs one (a frozen bias, a frozen weight, the input itself), and
    a loss that ignores the AuxK outputs."""
    for ratio in ("DENSE_SUPPORT_RATIO", "CUDA_DENSE_SUPPORT_RATIO"):
        monkeypatch.setattr(sparse, ratio, dense_ratio)
    monkeypatch.setattr(sparse, "SUPPORT_GEMM_DEVICES", set(gemm))
    torch.manual_seed(4)
    n, d, k, aux_k = 24, 6, 3, 4
    x0 = torch.randn(10, d, dtype=torch.float64)
    w0 = torch.randn(n, d, dtype=torch.float64)
    b0 = torch.randn(n, dtype=torch.float64) * 0.1 - 0.3
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    c_main, c_aux = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

    def leaves():  # fresh leaves each call (on the CPU, .to(device) returns the same tensor)
        return [t.clone().to(device).requires_grad_(name in needs)
                for t, name in ((x0, "x"), (w0, "w"), (b0, "b"))]

    x, w, b = leaves()
    dead, c_main, c_aux = dead.to(device), c_main.to(device), c_aux.to(device)
    vals, idx, aux_v, aux_i = sparse_linear_topk(x, w, b, k, dead.nonzero().squeeze(1), aux_k)
    loss = (vals * c_main[idx]).sum()
    if use_aux:
        loss = loss + (aux_v * c_aux[aux_i]).sum()
    loss.backward()
    x2, w2, b2 = leaves()
    codes, aux = _naive_linear_topk(x2, w2, b2, k, dead, aux_k)
    ref = (codes @ c_main).sum() + ((aux @ c_aux).sum() if use_aux else 0)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for ours, theirs in ((x, x2), (w, w2), (b, b2)):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad)
    # AuxK picks only dead concepts (zeros where a row has fewer positive dead entries)
    assert aux_i.shape == (10, aux_k) and bool(dead[aux_i].all())
    assert bool((aux_v > 0).any()) and bool((aux_v == 0).any())


def test_sparse_linear_topk_without_auxk_returns_empty_aux_codes():
    """Guards the empty (N, 0) AuxK outputs: no dead concepts given, none dead, or aux_k left
    at 0."""
    torch.manual_seed(5)
    x, w, b = torch.randn(7, 4), torch.randn(10, 4), torch.zeros(10)
    for dead, kwargs in ((None, {}), (torch.zeros(0, dtype=torch.long), {"aux_k": 3}),
                         (torch.arange(10), {})):
        _, _, aux_v, aux_i = sparse_linear_topk(x, w, b, 2, dead, **kwargs)
        assert aux_v.shape == (7, 0) and aux_i.shape == (7, 0) and aux_i.dtype == torch.long


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("support", ["none", "sparse", "dense", "dense-gemm"])
@pytest.mark.parametrize("needs", ["vd", "v", "d"])
def test_sparse_decode_train_gradients_match_dense_autograd(device, support, needs,
                                                            monkeypatch):
    """Guards the sorted-embedding_bag dictionary gradient (and its index tensors built on the
    dictionary's device) against the dense product's autograd; and, given the concepts every
    index falls in, both gradients as GEMMs over their rows (other rows exactly zero), and the
    forward too where ``support_gemm_on``; each gradient only for an input that needs one."""
    for ratio in ("DENSE_SUPPORT_RATIO", "CUDA_DENSE_SUPPORT_RATIO"):
        monkeypatch.setattr(sparse, ratio, 0 if support == "sparse" else 10**6)
    monkeypatch.setattr(sparse, "SUPPORT_GEMM_DEVICES",
                        {"cpu", "cuda"} if support == "dense-gemm" else set())
    torch.manual_seed(6)
    n, d, k = 20, 5, 3
    concepts = torch.tensor([1, 4, 5, 9, 12, 13, 17]) if support != "none" else torch.arange(n)
    idx = concepts[torch.argsort(torch.rand(8, len(concepts)), dim=1)[:, :k]].to(device)
    vals0 = torch.rand(8, k, dtype=torch.float64, device=device)
    dict0 = torch.randn(n, d, dtype=torch.float64, device=device)
    vals, dict_nd = vals0.clone().requires_grad_("v" in needs), \
        dict0.clone().requires_grad_("d" in needs)
    out = sparse_decode_train(vals, idx, dict_nd,
                              None if support == "none" else concepts.to(device))
    (out.sin().sum()).backward()
    v2, d2 = vals0.clone().requires_grad_(), dict0.clone().requires_grad_()
    dense = torch.zeros(8, n, dtype=torch.float64, device=device).scatter(1, idx, v2)
    ref = dense @ d2
    torch.testing.assert_close(out, ref)
    ref.sin().sum().backward()
    if "v" in needs:
        torch.testing.assert_close(vals.grad, v2.grad)
    if "d" in needs:
        torch.testing.assert_close(dict_nd.grad, d2.grad)
        assert dict_nd.grad.shape == (n, d)


def test_auxk_codes_are_a_gemm_over_the_support_on_cuda_only():
    """Guards the device rule: on CUDA, AuxK's decode and input gradient are GEMMs over the
    dead columns (embedding_bag ran ~10x slower there); on a CPU, embedding_bag."""
    assert sparse.support_gemm_on(torch.device("cuda", 0))
    assert not sparse.support_gemm_on(torch.device("cpu"))


def test_a_gradient_over_few_columns_is_a_dense_gemm():
    """Guards the rule that picks a GEMM over the support's columns: up to DENSE_SUPPORT_RATIO
    (8) columns per entry in a row on a CPU, 32 on CUDA, and a sparse product beyond."""
    assert sparse.DENSE_SUPPORT_RATIO == 8 and sparse.CUDA_DENSE_SUPPORT_RATIO == 32
    assert support_is_dense(1536, 384) and support_is_dense(24, 3)
    assert not support_is_dense(25, 3) and not support_is_dense(6144, 32)
    cuda = torch.device("cuda")
    assert support_is_dense(1536, 128, cuda) and support_is_dense(96, 3, cuda)
    assert not support_is_dense(97, 3, cuda) and not support_is_dense(1536, 128)


@pytest.mark.parametrize("gemm", [False, True])
def test_the_input_gradient_sends_auxk_through_a_gemm_only_where_the_device_says(gemm,
                                                                                monkeypatch):
    """Guards the input gradient's two exact ways with AuxK over a dense support: one
    embedding_bag over every entry (TopK's and AuxK's), or, where ``support_gemm_on``, a GEMM
    over the dead columns plus an embedding_bag over the TopK entries alone."""
    monkeypatch.setattr(sparse, "SUPPORT_GEMM_DEVICES", {"cpu"} if gemm else set())
    widths = []
    real = torch.nn.functional.embedding_bag

    def spy(indices, weight, *args, **kwargs):
        widths.append(indices.shape[1] if indices.dim() == 2 else None)
        return real(indices, weight, *args, **kwargs)

    torch.manual_seed(8)
    x = torch.randn(6, 5, requires_grad=True)
    w, b = torch.randn(16, 5), torch.zeros(16)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:4] = True  # 4 dead columns for 2 AuxK entries: a dense support on any device
    vals, _, aux_v, _ = sparse_linear_topk(x, w, b, 3, dead.nonzero().squeeze(1), 2)
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", spy)
    (vals.sum() + aux_v.sum()).backward()
    assert widths == ([3] if gemm else [3 + 2])


def test_the_support_rule_is_asked_with_the_codes_device(monkeypatch):
    """Guards the device passed to ``support_is_dense`` (its ratio differs on CUDA) by the
    encoder's backward and by the AuxK decode."""
    devices = []
    real = sparse.support_is_dense

    def spy(n_support, entries_per_row, device=None):
        devices.append(device)
        return real(n_support, entries_per_row, device)

    monkeypatch.setattr(sparse, "support_is_dense", spy)
    torch.manual_seed(9)
    x, w, b = torch.randn(6, 5), torch.randn(16, 5, requires_grad=True), torch.zeros(16)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:4] = True
    vals, idx, aux_v, aux_i = sparse_linear_topk(x, w, b, 3, dead.nonzero().squeeze(1), 2)
    dict_nd = torch.randn(16, 7, requires_grad=True)
    out = sparse_decode_train(aux_v, aux_i, dict_nd, dead.nonzero().squeeze(1))
    (vals.sum() + aux_v.sum() + out.sum()).backward()
    assert devices == [torch.device("cpu")] * 2
