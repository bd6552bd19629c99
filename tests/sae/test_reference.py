"""usae import-reference: the paper's checkpoint layout reproduces the reference's maths."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import exactly
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


# ---- in-process: what each key of the YAML and the checkpoint becomes -----------------------
def _rewrite(yaml_path, change):
    cfg = yaml.safe_load(yaml_path.read_text())
    change(cfg)
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))




def test_every_model_encodes_and_decodes_as_the_reference_in_process(tmp_path):
    yaml_path, params = write_reference(tmp_path, seed=3)
    sae = import_reference(yaml_path, tmp_path / "run")
    assert not sae.training
    x = torch.randn(30, 24, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    for name, d in MODELS.items():
        state, mean, std = params[name]
        z = sae.encode(name, x[:, :d])
        torch.testing.assert_close(z, reference_encode(state, mean, std, x[:, :d]),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae.decode(name, z), reference_decode(state, mean, std, z),
                                   atol=1e-4, rtol=1e-4)
        norm = sae.encoders[name].norm
        assert int(norm.num_batches_tracked) == 1234 and norm.eps == 1e-5


def test_reference_json_records_where_each_model_came_from(tmp_path):
    import json

    yaml_path, _ = write_reference(tmp_path)
    import_reference(str(yaml_path), str(tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "reference.json").read_text())
    assert record == {"source": str(yaml_path.resolve()), "models": {
        name: {"og_model": f"timm/{name.lower()}", "num_tokens": 196,
               "checkpoint_path": f"checkpoints/uni_{name}_checkpoint_9.pth"}
        for name in MODELS}}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["preset"] == "paper" and config["sae"]["encoder"] == "mlp_bn_1"
    assert config["sae"]["standardize"] == "scalar" and config["sae"]["dims"] == [24, 12, 24]
    assert config["sae"]["n_concepts"] == N and config["sae"]["k"] == K


def test_the_papers_defaults_fill_what_the_yaml_leaves_out(tmp_path):
    import json

    yaml_path, params = write_reference(tmp_path)

    def strip(cfg):
        del cfg["sae_params"], cfg["global"]
        for entry in cfg["model_zoo"].values():
            for key in ("model_mean", "model_std", "input_shape", "og_model", "num_tokens"):
                del entry[key]

    _rewrite(yaml_path, strip)
    sae = import_reference(yaml_path, tmp_path / "run")
    assert sae.cfg.k == 32 and sae.cfg.encoder == "mlp_bn_1"  # top_k's default
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    expected = reference_encode(params["DinoV2"][0], 0.0, 1.0, x)  # mean 0, std 1; top 5
    z = sae.encode("DinoV2", x)
    assert (z != 0).sum(1).max() <= 32
    kept = expected != 0  # the reference's top 5 are among the top 32
    torch.testing.assert_close(z[kept], expected[kept], atol=1e-4, rtol=1e-4)
    record = json.loads((tmp_path / "run" / "reference.json").read_text())
    assert record["models"]["ViT"] == {"og_model": None, "num_tokens": None,
                                       "checkpoint_path": "checkpoints/uni_ViT_checkpoint_9.pth"}
    _rewrite(yaml_path, lambda cfg: cfg.update(sae_params=None, **{"global": None}))
    assert import_reference(yaml_path, tmp_path / "run2").cfg.k == 32  # null sections: empty


def test_a_bare_state_dict_without_the_training_wrapper_is_accepted(tmp_path):
    yaml_path, params = write_reference(tmp_path)
    state, _, _ = params["ViT"]
    torch.save(state, tmp_path / "checkpoints" / "uni_ViT_checkpoint_9.pth")
    sae = import_reference(yaml_path, tmp_path / "run")
    torch.testing.assert_close(sae.encoders["ViT"].linear.weight,
                               state["encoder.final_block.0.weight"])


def test_half_precision_checkpoints_are_widened(tmp_path):
    yaml_path, params = write_reference(tmp_path)
    path = tmp_path / "checkpoints" / "uni_DinoV2_checkpoint_9.pth"
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in params["DinoV2"][0].items()}
    torch.save({"model_state_dict": state}, path)
    sae = import_reference(yaml_path, tmp_path / "run")
    assert sae.dictionaries["DinoV2"].dtype == torch.float32
    torch.testing.assert_close(sae.dictionaries["DinoV2"],
                               state["dictionary._weights"].float())


def test_checkpoints_are_read_safely_onto_the_cpu(tmp_path, monkeypatch):
    """weights_only=True is said, not left to torch's default (before torch 2.6 the default
    unpickled anything); map_location=cpu reads a GPU-saved file on a CPU machine."""
    yaml_path, _ = write_reference(tmp_path)
    calls = []
    real = torch.load

    def recording_load(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    import_reference(yaml_path, tmp_path / "run")
    assert calls == [{"map_location": "cpu", "weights_only": True}] * len(MODELS)


def test_a_checkpoint_is_looked_for_beside_the_cwd_then_the_yaml_then_its_parent(
        tmp_path, monkeypatch):
    yaml_path, _ = write_reference(tmp_path / "proj", ckpt_dir="ck", yaml_dir="cfg")
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    sae_parent = import_reference(yaml_path, tmp_path / "r1")  # found in the YAML's parent
    (tmp_path / "proj" / "cfg" / "ck").mkdir()
    (tmp_path / "proj" / "cfg" / "ck" / "uni_ViT_checkpoint_9.pth").write_bytes(b"broken")
    with pytest.raises(UsaeError, match="cfg/ck/uni_ViT_checkpoint_9.pth: "):  # YAML's first
        import_reference(yaml_path, tmp_path / "r2")
    (here / "ck").mkdir()
    (here / "ck" / "uni_ViT_checkpoint_9.pth").write_bytes(b"also broken")
    with pytest.raises(UsaeError, match="elsewhere/ck/uni_ViT_checkpoint_9.pth: "):  # cwd's
        import_reference(yaml_path, tmp_path / "r3")
    assert sae_parent.models == tuple(MODELS)


def test_a_missing_checkpoint_lists_every_place_looked(tmp_path, monkeypatch):
    yaml_path, _ = write_reference(tmp_path / "p", yaml_dir="cfg")
    monkeypatch.chdir(tmp_path)
    _rewrite(yaml_path, lambda c: c["model_zoo"]["SigLIP"].update(checkpoint_path="no.pth"))
    with exactly(f"checkpoint 'no.pth' not found (looked in: {tmp_path / 'no.pth'}, "
                f"{tmp_path / 'p' / 'cfg' / 'no.pth'}, {tmp_path / 'p' / 'no.pth'})"):
        import_reference(yaml_path, tmp_path / "run")
    _rewrite(yaml_path, lambda c: c["model_zoo"]["SigLIP"].update(
        checkpoint_path=str(tmp_path / "abs.pth")))
    with exactly(f"checkpoint '{tmp_path / 'abs.pth'}' not found (looked in: "
                f"{tmp_path / 'abs.pth'})"):
        import_reference(yaml_path, tmp_path / "run")


def test_an_absolute_or_home_path_is_used_as_given(tmp_path, monkeypatch):
    yaml_path, _ = write_reference(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    _rewrite(yaml_path, lambda c: c["model_zoo"]["ViT"].update(
        checkpoint_path="~/checkpoints/uni_ViT_checkpoint_9.pth"))
    _rewrite(yaml_path, lambda c: c["model_zoo"]["DinoV2"].update(
        checkpoint_path=str(tmp_path / "checkpoints" / "uni_DinoV2_checkpoint_9.pth")))
    monkeypatch.chdir("/")
    assert import_reference(yaml_path, tmp_path / "run").models == tuple(MODELS)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["sae_params"].update(encoder_module="mlp_ln_1"),
     "encoder_module 'mlp_ln_1' is not supported (only mlp_bn_1)"),
    (lambda c: c["sae_params"].update(dictionary_normalization="none"),
     "dictionary_normalization 'none' is not supported (only l2)"),
    (lambda c: c["model_zoo"].update(ViT="timm/vit"),
     "model_zoo entry 'ViT' has no checkpoint_path"),
    (lambda c: c["model_zoo"]["DinoV2"].pop("checkpoint_path"),
     "model_zoo entry 'DinoV2' has no checkpoint_path"),
    (lambda c: c["global"].update(exp_factor=4),
     f"global exp_factor x input_shape = {N // 2} but the checkpoints have n={N}"),
    (lambda c: c["model_zoo"]["ViT"].update(model_mean="high"),
     "model 'ViT': model_mean must be a number, got 'high'"),
    (lambda c: c["model_zoo"]["SigLIP"].update(model_std=[1.0, 2.0]),
     "model 'SigLIP': model_std must be a scalar (the paper's standardization)"),
    (lambda c: c["model_zoo"]["SigLIP"].update(model_std=None),
     "model 'SigLIP': model_std must be a number, got None"),
])
def test_a_yaml_the_import_cannot_honour_is_refused_with_the_reason(tmp_path, change, message):
    yaml_path, _ = write_reference(tmp_path)
    _rewrite(yaml_path, change)
    with exactly(message):
        import_reference(yaml_path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_global_section_with_one_of_its_two_keys_checks_nothing(tmp_path):
    yaml_path, _ = write_reference(tmp_path)
    _rewrite(yaml_path, lambda c: c.update(**{"global": {"exp_factor": 3}}))
    import_reference(yaml_path, tmp_path / "a")
    _rewrite(yaml_path, lambda c: c.update(**{"global": {"input_shape": 3}}))
    import_reference(yaml_path, tmp_path / "b")
    _rewrite(yaml_path, lambda c: c.update(**{"global": {"exp_factor": 1, "input_shape": N}}))
    import_reference(yaml_path, tmp_path / "c")  # 1 x 64 = n: the check passes


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping with a non-empty 'model_zoo' section"),
    ("model_zoo: {}\n", "expected a mapping with a non-empty 'model_zoo' section"),
    ("model_zoo: [a]\n", "expected a mapping with a non-empty 'model_zoo' section"),
    ("sae_params: {}\n", "expected a mapping with a non-empty 'model_zoo' section"),
])
def test_a_yaml_without_a_model_zoo_is_refused(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with exactly(f"{tmp_path / 'c.yaml'}: {message}"):
        import_reference(tmp_path / "c.yaml", tmp_path / "run")
    with exactly(f"cannot read {tmp_path / 'none.yaml'}: No such file or directory"):
        import_reference(tmp_path / "none.yaml", tmp_path / "run")


def _save_state(tmp_path, params, name, edit):
    state = dict(params[name][0])
    edit(state)
    path = tmp_path / "checkpoints" / f"uni_{name}_checkpoint_9.pth"
    torch.save({"model_state_dict": state}, path)
    return path


def test_a_checkpoint_that_is_not_a_usae_one_is_named(tmp_path):
    yaml_path, params = write_reference(tmp_path)
    path = tmp_path / "checkpoints" / "uni_ViT_checkpoint_9.pth"
    torch.save([1, 2], path)
    with exactly(f"model 'ViT': {path} holds no model_state_dict"):
        import_reference(yaml_path, tmp_path / "run")
    torch.save({"model_state_dict": "weights"}, path)
    with exactly(f"model 'ViT': {path} holds no model_state_dict"):
        import_reference(yaml_path, tmp_path / "run")
    _save_state(tmp_path, params, "ViT", lambda s: (s.pop("dictionary._weights"),
                                                     s.pop("encoder.final_block.0.bias")))
    with exactly(f"model 'ViT': {path} lacks ['encoder.final_block.0.bias', "
                "'dictionary._weights']; is it a USAE checkpoint?"):
        import_reference(yaml_path, tmp_path / "run")


def test_a_checkpoint_missing_its_norm_or_shaped_wrong_or_not_finite_is_named(tmp_path):
    yaml_path, params = write_reference(tmp_path)
    _save_state(tmp_path, params, "DinoV2",
                lambda s: s.pop("encoder.final_block.1.running_var"))
    with exactly("model 'DinoV2': checkpoint lacks encoder.final_block.1.running_var"):
        import_reference(yaml_path, tmp_path / "run")
    _save_state(tmp_path, params, "DinoV2",
                lambda s: s.update({"encoder.final_block.1.bias": torch.zeros(N + 1)}))
    with exactly(f"model 'DinoV2': encoder.final_block.1.bias has shape ({N + 1},), expected "
                f"({N},)"):
        import_reference(yaml_path, tmp_path / "run")
    bad = params["DinoV2"][0]["dictionary._weights"].clone()
    bad[3, 4] = float("nan")
    _save_state(tmp_path, params, "DinoV2", lambda s: s.update({"dictionary._weights": bad}))
    with exactly("model 'DinoV2': dictionary._weights contains NaN or Inf"):
        import_reference(yaml_path, tmp_path / "run")
    bad[3, 4] = float("-inf")
    with exactly("model 'DinoV2': dictionary._weights contains NaN or Inf"):
        _save_state(tmp_path, params, "DinoV2",
                    lambda s: s.update({"dictionary._weights": bad}))
        import_reference(yaml_path, tmp_path / "run")


def test_checkpoints_that_disagree_on_n_are_refused(tmp_path):
    yaml_path, params = write_reference(tmp_path)

    def widen(state):
        for key, value in list(state.items()):
            if value.dim() >= 1:
                state[key] = torch.cat([value, value[:4]])

    _save_state(tmp_path, params, "ViT", widen)
    with exactly(f"checkpoints disagree on the number of concepts: [{N}, {N + 4}]"):
        import_reference(yaml_path, tmp_path / "run")


def test_a_read_error_shows_its_first_line(tmp_path, monkeypatch):
    yaml_path, _ = write_reference(tmp_path)

    def failing(path, **kwargs):
        raise RuntimeError("Weights only load failed.\nIn PyTorch 2.6 ... (long advice)")

    monkeypatch.setattr(torch, "load", failing)
    path = tmp_path / "checkpoints" / "uni_SigLIP_checkpoint_9.pth"
    with exactly(f"model 'SigLIP': cannot read checkpoint {path}: Weights only load failed."):
        import_reference(yaml_path, tmp_path / "run")
