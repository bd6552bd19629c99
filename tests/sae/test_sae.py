import numpy as np
import pytest
import torch

from usae.config import resolve
from usae.errors import UsaeError
from usae.sae.model import UniversalSAE, densify, normalize_rows, sparse_decode


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


def _hand_encoder(x, w, b, kind, eps=1e-5):
    """The encoders written out: Linear, then BatchNorm (batch statistics, biased variance),
    LayerNorm over concepts, or nothing; norm affine parameters at their initial 1 and 0."""
    h = x @ w.T + b
    if kind == "mlp_bn_1":
        return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + eps)
    if kind == "mlp_ln_1":
        return (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False,
                                                                keepdim=True) + eps)
    return h


@pytest.mark.parametrize("encoder", ["mlp_bn_1", "mlp_ln_1", "linear"])
def test_each_encoder_kind_is_its_written_out_formula(encoder):
    """Guards the encoder kinds (a swapped or dropped norm) and BatchNorm's eps of 1e-5: one
    feature's batch variance is 1e-5, so another eps changes the output."""
    sae, _ = make_sae(encoder=encoder)
    torch.manual_seed(3)
    x = torch.randn(16, 12, dtype=torch.float64)
    x[:, 0] = 0.0
    lin = sae.encoders["m0"].linear
    with torch.no_grad():
        lin.weight[0] = 0.0
        lin.weight[0, 1] = 0.003
    sae.double().train()
    got = sae.encoders["m0"](x)
    expected = _hand_encoder(x, lin.weight.detach(), lin.bias.detach(), encoder)
    torch.testing.assert_close(got, expected)
    assert x[:, 1].mul(0.003).var(unbiased=False) < 1e-4  # where eps matters


def test_encode_standardizes_then_takes_topk_of_relu_by_hand():
    """Guards standardization ((x - mean) / (std + 1e-5), not * or +) and the whole encode
    against a hand-written pipeline on a linear encoder, in a one-model SAE."""
    sae, _ = make_sae(encoder="linear", dims=(12,))
    mean, std = torch.linspace(-1, 1, 12), torch.linspace(0.5, 2, 12)
    sae.set_standardization("m0", mean, std)
    x = torch.randn(9, 12) * 3 + 1
    xs = (x - mean) / (std + 1e-5)
    torch.testing.assert_close(sae.standardize("m0", x), xs)
    lin = sae.encoders["m0"].linear
    post = torch.relu(xs @ lin.weight.detach().T + lin.bias.detach())
    kth = post.topk(4, dim=1).values[:, -1:]
    expected = torch.where(post >= kth, post, torch.zeros_like(post))
    torch.testing.assert_close(sae.encode("m0", x), expected)


def test_half_precision_statistics_keep_the_eps():
    """Guards the float32 conversion in set_standardization: 1 + 1e-5 is 1 in float16."""
    sae, _ = make_sae()
    sae.set_standardization("m0", torch.zeros(12, dtype=torch.float16),
                            torch.ones(12, dtype=torch.float16))
    assert torch.equal(sae.scale_m0, torch.full((12,), 1.0, dtype=torch.float32) + 1e-5)


def test_dictionary_rows_start_near_unit_norm():
    """Guards the initialization randn(n, d) / sqrt(d): rows of norm about 1 at any d."""
    sae, _ = make_sae(n=256, dims=(64, 8))
    for m in ("m0", "m1"):
        norms = sae.dictionaries[m].detach().norm(dim=1)
        assert 0.85 < norms.mean() < 1.15


def test_normalize_rows_adds_eps_to_the_norm():
    """Guards `norm + 1e-8`: a row of norm 1e-8 becomes a row of norm 0.5 (not inf)."""
    w = torch.zeros(2, 3, dtype=torch.float64)
    w[0, 0] = 1e-8
    w[1] = torch.tensor([3.0, 4.0, 0.0])
    out = normalize_rows(w)
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([0.5, 1.0 / (1 + 2e-9)],
                                                            dtype=torch.float64))


def test_nan_error_counts_the_bad_rows():
    """Guards the count in the NaN message: rows with any non-finite value."""
    sae, _ = make_sae()
    x = torch.randn(4, 12)
    x[0] = float("nan")
    x[2, 5] = float("inf")
    with pytest.raises(UsaeError, match=r"in 2 row\(s\)"):
        sae.encode("m0", x)


def test_save_into_a_new_nested_folder_marks_the_run_final(tmp_path):
    """Guards save's mkdir(parents=True) and the final status in config.json."""
    import json

    sae, cfg = make_sae()
    target = tmp_path / "a" / "b"
    sae.save(target, cfg)
    assert json.loads((target / "config.json").read_text())["status"]["state"] == "final"


def test_load_is_strict_and_says_what_does_not_match(tmp_path):
    """Guards strict loading (a missing weight is refused) and the one-line error message
    built from torch's detail lines."""
    from safetensors.torch import load_file, save_file

    sae, cfg = make_sae()
    sae.save(tmp_path, cfg)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["dictionaries.m1"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UsaeError, match=r'config.json: Missing key\(s\) in state_dict: '
                                        r'"dictionaries.m1"') as err:
        UniversalSAE.load(tmp_path)
    assert "\n" not in str(err.value) and "Error(s) in loading" not in str(err.value)
    other, other_cfg = make_sae(n=16)
    other.save(tmp_path, cfg)
    with pytest.raises(UsaeError) as err:
        UniversalSAE.load(tmp_path)
    assert "]). size mismatch for " in str(err.value) and "\n" not in str(err.value)


def test_load_puts_the_sae_on_the_device_in_eval_mode(tmp_path):
    """Guards `.to(device).eval()` in load (the meta device needs no GPU)."""
    sae, cfg = make_sae()
    sae.save(tmp_path, cfg)
    loaded = UniversalSAE.load(tmp_path, device="meta")
    assert loaded.device_of().type == "meta" and not loaded.training


def test_encode_standardized_returns_the_public_pre_activations():
    """``EncodeOut.pre_nc`` is the encoder output before ReLU, as ``pre_activations`` gives it;
    the codes are the rule's selection from its ReLU."""
    cfg = resolve(("a", "b"), (6, 4), "paper", {"n_concepts": 12, "k": 3}).sae
    torch.manual_seed(0)
    sae = UniversalSAE(cfg).eval()
    xs = torch.randn(5, 4)
    out = sae.encode_standardized("b", xs)
    assert torch.equal(out.pre_nc, sae.pre_activations("b", xs))
    top = torch.relu(out.pre_nc).topk(3, dim=1)
    assert torch.equal(out.values_nk.sort(1).values, top.values.sort(1).values)
