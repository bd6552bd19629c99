import json

import pytest

from usae.config import (
    TRAIN_PRESETS,
    RunConfig,
    SAEConfig,
    load_config_file,
    parse_set,
    resolve,
)
from usae.errors import UsaeError


def test_paper_preset_is_the_default_and_matches_the_paper():
    cfg = resolve(("a", "b", "c"), (768, 384, 768), "paper")
    assert TRAIN_PRESETS["paper"] == {}
    assert cfg.sae.n == 6144 and cfg.sae.k == 32 and cfg.sae.encoder == "mlp_bn_1"
    assert cfg.sae.standardize == "scalar"
    t = cfg.train
    assert (t.lr, t.weight_decay, t.grad_clip, t.batch_images) == (3e-4, 1e-5, 1.0, 32)
    assert (t.criterion, t.aux, t.aux_coef, t.decoder_update, t.schedule) == \
        ("l1", "reference", 0.1, "source", "per_model")


def test_overrides_are_typed_and_routed():
    cfg = resolve(("a",), (8,), "paper", parse_set(["k=4", "lr=1e-3", "n_concepts=64",
                                                    "shuffle_pairing=true"]))
    assert cfg.sae.k == 4 and cfg.sae.n == 64 and cfg.train.lr == 1e-3
    assert cfg.train.shuffle_pairing is True


@pytest.mark.parametrize("overrides, msg", [
    ({"k": 100, "n_concepts": 64}, "larger than the number of concepts"),
    ({"nope": 1}, "unknown key"),
    ({"encoder": "mlp_bn_9"}, "encoder must be one of"),
    ({"lr": "fast"}, "not a valid float"),
    ({"aux": "other"}, "aux must be one of"),
    ({"device": "tpu"}, "device must be"),
])
def test_bad_configs_fail_clearly(overrides, msg):
    with pytest.raises(UsaeError, match=msg):
        resolve(("a",), (8,), "paper", overrides)


def test_unknown_preset():
    with pytest.raises(UsaeError, match="unknown preset"):
        resolve(("a",), (8,), "fastest")


def test_round_trip_json():
    cfg = resolve(("a", "b"), (8, 4), "demo", {"k": 2})
    again = RunConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.01\nsae:\n  k: 3\n")
    assert load_config_file(tmp_path / "c.yaml") == {"lr": 0.01, "k": 3}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UsaeError, match="not valid"):
        load_config_file(tmp_path / "bad.json")


def test_sae_config_validation():
    with pytest.raises(UsaeError, match="duplicate"):
        SAEConfig(models=("a", "a"), dims=(1, 1))
    with pytest.raises(UsaeError, match="dims"):
        SAEConfig(models=("a",), dims=(1, 2))


def test_a_run_trained_on_cuda_reads_its_config_on_a_cpu_machine(monkeypatch):
    """The device in a run's config is where it was trained: reading it (eval, encode on a
    CPU machine) must not require CUDA; the trainer checks CUDA when it starts."""
    import torch

    from usae.config import RunConfig, resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = resolve(("a",), (4,), "paper", {"device": "cuda"})
    assert RunConfig.from_json(cfg.to_json()).train.device == "cuda"
