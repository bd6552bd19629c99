"""usae import-reference: the paper's checkpoint layout reproduces the reference's maths."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from usae.errors import UsaeError
from usae.sae.model import UniversalSAE
from usae.sae.reference import import_reference

MODELS = {"SigLIP": 24, "DinoV2": 12, "ViT": 24}
N, K = 64, 5


def write_reference(folder, ckpt_dir="checkpoints", yaml_dir=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    (folder / ckpt_dir).mkdir(parents=True, exist_ok=True)
    zoo, params = {}, {}
    for name, d in MODELS.items():
        state = {
            "encoder.final_block.0.weight": torch.randn(N, d, generator=g) * 0.3,
            "encoder.final_block.0.bias": torch.randn(N, generator=g) * 0.1,
            "encoder.final_block.1.weight": torch.rand(N, generator=g) + 0.5,
            "encoder.final_block.1.bias": torch.randn(N, generator=g) * 0.1,
            "encoder.final_block.1.running_mean": torch.randn(N, generator=g) * 0.2,
            "encoder.final_block.1.running_var": torch.rand(N, generator=g) + 0.5,
            "encoder.final_block.1.num_batches_tracked": torch.tensor(1234),
            "dictionary._weights": torch.randn(N, d, generator=g) * 2.0,
        }
        path = f"{ckpt_dir}/uni_{name}_checkpoint_9.pth"
        torch.save({"epoch": 9, "model_state_dict": state,
                    "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 3e-4}]},
                    "learning_rate": 3e-4}, folder / path)
        mean, std = float(torch.randn(1, generator=g)), float(torch.rand(1, generator=g) + 1)
        zoo[name] = {"checkpoint_path": path, "input_shape": d, "num_tokens": 196,
                     "og_model": f"timm/{name.lower()}", "model_mean": mean, "model_std": std}
        params[name] = (state, mean, std)
    cfg = {"global": {"exp_factor": 8, "input_shape": N // 8},
           "sae_params": {"encoder_module": "mlp_bn_1", "top_k": K,
                          "dictionary_normalization": "l2"},
           "model_zoo": zoo}
    ydir = folder / (yaml_dir or "")
    ydir.mkdir(parents=True, exist_ok=True)
    (ydir / "usae.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ydir / "usae.yaml", params


def reference_encode(state, mean, std, x):
    x = (x - mean) / (std + 1e-5)
    h = x @ state["encoder.final_block.0.weight"].T + state["encoder.final_block.0.bias"]
    h = (h - state["encoder.final_block.1.running_mean"]) / torch.sqrt(
        state["encoder.final_block.1.running_var"] + 1e-5)
    h = torch.relu(h * state["encoder.final_block.1.weight"] + state["encoder.final_block.1.bias"])
    v, i = torch.topk(h, K, dim=1)
    return torch.zeros_like(h).scatter(1, i, v)


def reference_decode(state, mean, std, z):
    w = state["dictionary._weights"]
    return z @ (w / (w.norm(dim=1, keepdim=True) + 1e-8)) * (std + 1e-5) + mean


def test_cli_import_encode_decode_reproduce_the_reference(tmp_path, monkeypatch):
    yaml_path, params = write_reference(tmp_path / "ref")
    monkeypatch.chdir(tmp_path)  # checkpoint paths resolve relative to the YAML's folder
    run = tmp_path / "run"
    usae = [sys.executable, "-m", "usae.cli"]
    subprocess.run(usae + ["import-reference", str(yaml_path), "--out", str(run)], check=True)
    x = torch.randn(40, MODELS["DinoV2"], dtype=torch.float64) * 3 + 1
    np.save(tmp_path / "x.npy", x.numpy().astype(np.float32))
    subprocess.run(usae + ["encode", str(run), "--model", "DinoV2", "--input",
                           str(tmp_path / "x.npy"), "--out", str(tmp_path / "z.npy")], check=True)
    z = np.load(tmp_path / "z.npy")
    state, mean, std = params["DinoV2"]
    expected = reference_encode({k: v.double() for k, v in state.items()}, mean, std, x)
    assert z.dtype == np.float32 and z.shape == (40, N)
    np.testing.assert_allclose(z, expected.numpy(), atol=1e-4, rtol=1e-4)
    subprocess.run(usae + ["decode", str(run), "--model", "ViT", "--codes",
                           str(tmp_path / "z.npy"), "--out", str(tmp_path / "xh.npy")], check=True)
    st_v, mean_v, std_v = params["ViT"]
    expected_x = reference_decode({k: v.double() for k, v in st_v.items()}, mean_v, std_v,
                                  torch.from_numpy(z).double())
    np.testing.assert_allclose(np.load(tmp_path / "xh.npy"), expected_x.numpy(), atol=1e-4,
                               rtol=1e-4)


def test_the_run_is_a_normal_run(tmp_path):
    yaml_path, _ = write_reference(tmp_path)
    import_reference(yaml_path, tmp_path / "run")
    sae = UniversalSAE.load(tmp_path / "run")
    assert sae.models == tuple(MODELS) and sae.cfg.n == N and sae.cfg.k == K
    assert (tmp_path / "run" / "config.json").exists()


def test_paths_relative_to_the_yaml_parent(tmp_path, monkeypatch):
    yaml_path, _ = write_reference(tmp_path, ckpt_dir="ckpts", yaml_dir="configs")
    monkeypatch.chdir(tmp_path / "configs")
    sae = import_reference(yaml_path, tmp_path / "run")
    again = UniversalSAE.load(tmp_path / "run")
    for m in sae.models:
        torch.testing.assert_close(again.dictionaries[m], sae.dictionaries[m])


def test_missing_and_corrupt_checkpoints(tmp_path):
    yaml_path, _ = write_reference(tmp_path)
    ck = tmp_path / "checkpoints" / "uni_ViT_checkpoint_9.pth"
    ck.write_bytes(b"not a zip")
    with pytest.raises(UsaeError, match="ViT.*cannot read checkpoint"):
        import_reference(yaml_path, tmp_path / "run")
    ck.unlink()
    with pytest.raises(UsaeError, match="not found"):
        import_reference(yaml_path, tmp_path / "run")


def test_unsafe_pickles_are_refused(tmp_path):
    yaml_path, _ = write_reference(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_state_dict": {"x": Evil()}},
               tmp_path / "checkpoints" / "uni_SigLIP_checkpoint_9.pth")
    with pytest.raises(UsaeError, match="SigLIP.*cannot read checkpoint"):
        import_reference(yaml_path, tmp_path / "run")


def test_shape_mismatch_and_bad_yaml(tmp_path):
    yaml_path, _ = write_reference(tmp_path)
    cfg = yaml.safe_load(yaml_path.read_text())
    cfg["model_zoo"]["ViT"]["input_shape"] = 99
    yaml_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsaeError, match="ViT.*input_shape 99"):
        import_reference(yaml_path, tmp_path / "run")
    yaml_path.write_text("model_zoo: [")
    with pytest.raises(UsaeError, match="not valid YAML"):
        import_reference(yaml_path, tmp_path / "run")
