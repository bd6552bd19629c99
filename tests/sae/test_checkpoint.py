"""usae.sae.checkpoint on its own: an optimizer's state survives the flat tensors, the header
holds what was written, and a resume is refused exactly when the maths would change."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from usae.config import resolve
from usae.errors import ConfigMismatch, UsaeError
from usae.sae.checkpoint import (
    RESUMABLE_KEYS,
    check_resumable,
    load_checkpoint,
    load_optimizer,
    optimizer_tensors,
    read_checkpoint_config,
    read_checkpoint_position,
    save_checkpoint,
)


def _cfg(**overrides):
    return resolve(("a", "b"), (6, 4), "paper", {"n_concepts": 16, "k": 2, **overrides})


def _adam_after_two_steps(seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.Adam(params, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    return params, opt


def test_optimizer_tensors_are_flat_named_copies():
    params, opt = _adam_after_two_steps()
    flat = optimizer_tensors("enc_a", opt)
    assert sorted(flat) == [f"opt.enc_a.{i}.{key}" for i in (0, 1)
                            for key in ("exp_avg", "exp_avg_sq", "step")]
    state = opt.state[params[0]]
    assert torch.equal(flat["opt.enc_a.0.exp_avg"], state["exp_avg"])
    assert flat["opt.enc_a.0.exp_avg"].data_ptr() != state["exp_avg"].data_ptr()  # a copy
    assert float(flat["opt.enc_a.1.step"]) == 2.0


def test_an_optimizer_restored_from_its_tensors_steps_as_the_original():
    params, opt = _adam_after_two_steps()
    flat = optimizer_tensors("m", opt)
    flat["opt.other.0.exp_avg"] = torch.full((3, 2), 99.0)  # another model's: ignored
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = torch.optim.Adam(twins, lr=0.1)
    load_optimizer("m", twin_opt, flat, torch.device("cpu"))
    for a, b in zip(params, twins):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], twin_opt.state[b][key])
    for o, ps in ((opt, params), (twin_opt, twins)):
        o.zero_grad()
        sum((p ** 2).sum() for p in ps).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))  # bit-identical
    assert twin_opt.state[twins[0]]["step"].device.type == "cpu"


def test_a_checkpoint_round_trips_its_tensors_position_and_config(tmp_path):
    cfg = _cfg(lr=2e-4)
    position = {"step": 12, "tokens": 3072, "elapsed_s": 1.5, "threads": 1}
    tensors = {"model.enc.a": torch.arange(6.0).reshape(2, 3), "since_fired": torch.zeros(4)}
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, tensors, position, cfg)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["position"]) == position
    assert json.loads(meta["config"]) == json.loads(json.dumps(cfg.to_json()))
    assert read_checkpoint_position(path) == position
    assert read_checkpoint_config(path) == cfg
    back = load_checkpoint(path)
    assert back.config == cfg and back.position == position
    assert sorted(back.tensors) == sorted(tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())


def test_a_missing_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    with pytest.raises(UsaeError) as info:
        read_checkpoint_position(tmp_path / "run" / "checkpoint.safetensors")
    assert str(info.value) == f"no checkpoint.safetensors in {tmp_path / 'run'}: nothing to " \
                              "resume"


@pytest.mark.parametrize("damage", ["not safetensors", "no metadata", "bad json"])
def test_a_damaged_checkpoint_says_to_train_again(tmp_path, damage):
    path = tmp_path / "checkpoint.safetensors"
    tensors = {"x": torch.zeros(1)}
    if damage == "not safetensors":
        path.write_bytes(b"garbage")
    elif damage == "no metadata":
        save_file(tensors, str(path))
    elif damage == "bad json":
        save_file(tensors, str(path), metadata={"config": "{", "position": "{}"})
    for read in (read_checkpoint_config, read_checkpoint_position, load_checkpoint):
        with pytest.raises(UsaeError) as info:
            read(path)
        assert str(info.value).startswith(f"checkpoint {path} is corrupt (")
        assert str(info.value).endswith("); delete the run folder and train again")


def test_a_config_the_checkpoint_cannot_hold_passes_its_own_error_through(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"config": '{"train": {}}',
                                                          "position": "{}"})
    with pytest.raises(UsaeError) as info:
        read_checkpoint_position(path)
    assert str(info.value) == "config.json is malformed: 'sae'"


def test_every_resumable_key_may_change_and_nothing_else(tmp_path):
    saved = _cfg()
    changed = {"log_every": 7, "checkpoint_every": 9, "checkpoint_minutes": 1.0,
               "eval_every": 3, "eval_batches": 2, "device": "cuda", "tensorboard": True,
               "wandb": True, "keep_freed_memory": not saved.train.keep_freed_memory,
               "fused_optimizer": not saved.train.fused_optimizer}
    assert set(changed) == RESUMABLE_KEYS
    now = dataclasses.replace(saved, train=dataclasses.replace(saved.train, **changed))
    check_resumable(saved, now)  # no error
    check_resumable(saved, saved)


def test_a_changed_config_is_refused_naming_each_key_old_and_new():
    saved = _cfg()
    now = dataclasses.replace(
        saved, sae=dataclasses.replace(saved.sae, k=3),
        train=dataclasses.replace(saved.train, lr=0.5, log_every=1, seed=4))
    with pytest.raises(ConfigMismatch) as info:
        check_resumable(saved, now)
    assert str(info.value) == (
        f"cannot resume with a different config (k: 2 -> 3; lr: {saved.train.lr!r} -> 0.5; "
        f"seed: {saved.train.seed!r} -> 4) — drop those options, or train into a new folder")
    assert isinstance(info.value, UsaeError)


def test_a_key_the_old_config_lacked_reads_as_none():
    saved = _cfg()
    now = dataclasses.replace(saved, sae=dataclasses.replace(saved.sae, models=("a", "c")))
    with pytest.raises(ConfigMismatch, match=r"\(models: \('a', 'b'\) -> \('a', 'c'\)\)"):
        check_resumable(saved, now)
