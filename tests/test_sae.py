import numpy as np
import pytest
import torch

from usae.config import resolve
from usae.errors import UsaeError
from usae.sae import UniversalSAE, densify, normalize_rows, sparse_decode


def make_sae(n=32, k=4, dims=(12, 8), encoder="mlp_bn_1"):
    torch.manual_seed(0)
    cfg = resolve(tuple(f"m{i}" for i in range(len(dims))), dims, "paper",
                  {"n_concepts": n, "k": k, "encoder": encoder})
    return UniversalSAE(cfg.sae), cfg


@pytest.mark.parametrize("encoder", ["mlp_bn_1", "mlp_ln_1", "linear"])
def test_encode_is_topk_of_relu(encoder):
    sae, _ = make_sae(encoder=encoder)
    x = torch.randn(20, 12)
    codes = sae.encode("m0", x)
    assert codes.shape == (20, 32) and codes.dtype == torch.float32
    assert ((codes > 0).sum(1) <= 4).all() and (codes >= 0).all()
    sae.eval()
    pre = sae.encoders["m0"](sae.standardize("m0", x))
    expected = torch.relu(pre)
    kth = expected.topk(4, dim=1).values[:, -1:]
    expected = torch.where(expected >= kth, expected, torch.zeros_like(expected))
    torch.testing.assert_close(codes, expected.detach())


def test_decode_uses_row_normalized_dictionary_and_unstandardizes():
    sae, _ = make_sae()
    sae.set_standardization("m1", torch.tensor(2.0), torch.tensor(3.0))
    codes = torch.rand(5, 32)
    w = sae.dictionaries["m1"].detach()
    expected = codes @ (w / (w.norm(dim=1, keepdim=True) + 1e-8)) * (3.0 + 1e-5) + 2.0
    torch.testing.assert_close(sae.decode("m1", codes), expected)


def test_sparse_decode_equals_dense():
    torch.manual_seed(1)
    d = normalize_rows(torch.randn(32, 6))
    vals, idx = torch.rand(10, 4), torch.randint(0, 32, (10, 4))
    idx = torch.argsort(torch.rand(10, 32), dim=1)[:, :4]
    torch.testing.assert_close(sparse_decode(vals, idx, d), densify(vals, idx, 32) @ d)


def test_normalization_leaves_weights_unnormalized():
    sae, _ = make_sae()
    before = sae.dictionaries["m0"].detach().clone()
    sae.normalized_dict("m0")
    assert torch.equal(before, sae.dictionaries["m0"].detach())
    assert not torch.allclose(before.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("x, msg", [
    (torch.randn(3, 11), r"expected activations of shape \(N, 12\)"),
    (torch.randn(3), "expected activations of shape"),
    (torch.tensor([[float("nan")] * 12]), "NaN or Inf"),
])
def test_bad_inputs_name_the_model(x, msg):
    sae, _ = make_sae()
    with pytest.raises(UsaeError, match="m0.*" + msg if "NaN" in msg else msg):
        sae.encode("m0", x)


def test_unknown_model():
    sae, _ = make_sae()
    with pytest.raises(UsaeError, match="unknown model 'zz'"):
        sae.encode("zz", torch.randn(2, 12))
    with pytest.raises(UsaeError, match="codes must have shape"):
        sae.decode("m0", torch.randn(2, 31))


def test_save_load_round_trip(tmp_path):
    sae, cfg = make_sae()
    sae.set_standardization("m0", torch.arange(12.0), torch.ones(12) * 2)
    sae.save(tmp_path, cfg)
    again = UniversalSAE.load(tmp_path)
    x = torch.randn(7, 12)
    torch.testing.assert_close(sae.encode("m0", x), again.encode("m0", x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_corrupt_files_fail_clearly(tmp_path):
    sae, cfg = make_sae()
    sae.save(tmp_path, cfg)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsaeError, match="not a valid safetensors"):
        UniversalSAE.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UsaeError, match="corrupt"):
        UniversalSAE.load(tmp_path)
    with pytest.raises(UsaeError, match="not a usae run"):
        UniversalSAE.load(tmp_path / "nowhere")


def test_weights_not_matching_config(tmp_path):
    sae, cfg = make_sae()
    sae.save(tmp_path, cfg)
    other, other_cfg = make_sae(n=16)
    other_cfg_json = other_cfg
    from usae.files import atomic_write_json

    atomic_write_json(tmp_path / "config.json", other_cfg_json.to_json())
    with pytest.raises(UsaeError, match="does not match config.json"):
        UniversalSAE.load(tmp_path)


def test_default_n_is_eight_times_max_dim():
    sae, _ = make_sae(n=0, dims=(12, 8))
    assert sae.cfg.n == 96
    assert np.isclose(sae.encode("m1", torch.randn(3, 8)).shape[1], 96)
