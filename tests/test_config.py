import dataclasses
import json

import pytest

from tests.conftest import exactly
from usae.config import (
    MAX_SEED,
    TRAIN_PRESETS,
    RunConfig,
    SAEConfig,
    TrainConfig,
    from_dict,
    key_value,
    load_config_file,
    parse_set,
    resolve,
    split_overrides,
    with_train,
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


# ---- every rule of the config tree, with the message a user reads ------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ("a", "b"), "dims": (4,)}, "config: 2 model names but 1 dims"),
    ({"models": ("a", "b", "a"), "dims": (1, 2, 3)},
     "config: duplicate model names in ['a', 'b', 'a']"),
    ({"models": ("a", "b"), "dims": (4, 0)},
     "config: every model dim must be positive, got [4, 0]"),
    ({"models": ("a",), "dims": (-3,)}, "config: every model dim must be positive, got [-3]"),
    ({"models": ("a",), "dims": (4,), "sparsity": "l0"},
     "config: sparsity must be one of ['batchtopk', 'energy', 'topk'], got 'l0'"),
    ({"models": ("a",), "dims": (4,), "k": 0}, "config: k must be positive, got 0"),
    ({"models": ("a",), "dims": (4,), "k": -2}, "config: k must be positive, got -2"),
    ({"models": ("a",), "dims": (4,), "energy_fraction": 0.0},
     "config: energy_fraction must be above 0 (a code would keep nothing), got 0.0"),
    ({"models": ("a",), "dims": (4,), "n_concepts": -1},
     "config: n_concepts must be positive (or 0 for 8 x max d), got -1"),
    ({"models": ("a",), "dims": (4,), "n_concepts": 8, "k": 9},
     "config: k=9 is larger than the number of concepts n=8"),
    ({"models": ("a",), "dims": (2,), "k": 17},
     "config: k=17 is larger than the number of concepts n=16"),
])
def test_sae_config_refuses_with_the_rule_it_broke(kwargs, message):
    with exactly(message):
        SAEConfig(**kwargs)


def test_sae_config_boundaries_that_are_allowed():
    assert SAEConfig().n == 0  # no models yet: a config still to be filled from the data
    assert SAEConfig(models=("a",), dims=(1,), k=8).n == 8  # k == n
    assert SAEConfig(models=("a", "b"), dims=(3, 5), k=1).n == 40  # 8 x max d
    assert SAEConfig(models=("a",), dims=(4,), n_concepts=6, k=2).n == 6
    assert SAEConfig(models=("a",), dims=(4,), energy_fraction=1.0).energy_fraction == 1.0
    assert SAEConfig(models=("a",), dims=(4,), energy_fraction=1e-9).energy_fraction == 1e-9


@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "huber"}, "config: criterion must be one of ['l1', 'l2'], got 'huber'"),
    ({"device": "gpu"}, "config: device must be cpu or cuda[:i], got 'gpu'"),
    ({"device": "CPU"}, "config: device must be cpu or cuda[:i], got 'CPU'"),
    ({"lr": 0.0}, "config: lr must be positive, got 0.0"),
    ({"lr": -1e-3}, "config: lr must be positive, got -0.001"),
    ({"seed": -1}, f"config: seed must be an integer from 0 to {MAX_SEED}, got -1"),
    ({"seed": MAX_SEED + 1},
     f"config: seed must be an integer from 0 to {MAX_SEED}, got {MAX_SEED + 1}"),
    ({"matryoshka": (0, 8)}, "config: matryoshka must be increasing positive prefix sizes, "
                             "got [0, 8]"),
    ({"matryoshka": (8, 4)}, "config: matryoshka must be increasing positive prefix sizes, "
                             "got [8, 4]"),
    ({"matryoshka": (4, 4)}, "config: matryoshka must be increasing positive prefix sizes, "
                             "got [4, 4]"),
    ({"active_set": "global"}, "config: active_set=global steps every model each iteration; "
     "it needs decoder_update=all and schedule=global (the fast preset's)"),
    ({"active_set": "global", "decoder_update": "all"}, "config: active_set=global steps "
     "every model each iteration; it needs decoder_update=all and schedule=global (the fast "
     "preset's)"),
    ({"active_set": "global", "schedule": "global"}, "config: active_set=global steps every "
     "model each iteration; it needs decoder_update=all and schedule=global (the fast "
     "preset's)"),
    ({"cross_coef": 0.5}, "config: cross_coef is for active_set=global (with source, the "
                          "source's codes already reconstruct every model)"),
])
def test_train_config_refuses_with_the_rule_it_broke(kwargs, message):
    with exactly(message):
        TrainConfig(**kwargs)


def test_train_config_boundaries_that_are_allowed():
    assert TrainConfig(device="cuda").device == "cuda"
    assert TrainConfig(device="cuda:3").device == "cuda:3"
    assert TrainConfig(seed=0).seed == 0 and TrainConfig(seed=MAX_SEED).seed == MAX_SEED
    assert TrainConfig(matryoshka=(1, 2, 64)).matryoshka == (1, 2, 64)
    assert TrainConfig(lr=1e-12).lr == 1e-12
    glob = TrainConfig(active_set="global", decoder_update="all", schedule="global",
                       cross_coef=0.5)
    assert glob.cross_coef == 0.5


@pytest.mark.parametrize("settings, per_epoch, steps", [
    ({}, 10, 10), ({"epochs": 3}, 10, 30), ({"epochs": 3, "min_steps": 50}, 10, 50),
    ({"epochs": 3, "min_steps": 20}, 10, 30), ({"max_steps": 7, "min_steps": 50}, 10, 7),
    ({"max_steps": 70, "epochs": 2}, 10, 70), ({}, 0, 0), ({"min_steps": 5}, 0, 5),
])
def test_total_steps_is_max_steps_or_the_larger_of_epochs_and_min_steps(settings, per_epoch,
                                                                        steps):
    assert TrainConfig(**settings).total_steps(per_epoch) == steps


def _run(**train):
    sae = SAEConfig(models=("a", "b", "c"), dims=(4, 4, 4), n_concepts=16, k=2)
    return RunConfig(sae=sae, train=TrainConfig(**train))


@pytest.mark.parametrize("train, message", [
    ({"frozen_models": ("a", "x", "w")},
     "config: frozen_models ['w', 'x'] are not models of this run (['a', 'b', 'c'])"),
    ({"frozen_models": ("a", "b", "c")}, "config: every model is frozen; nothing would train"),
    ({"match_coef": 0.1}, "config: match_coef pulls new models towards frozen ones: it needs "
     "frozen_models (usae train --extend) and active_set=source"),
    ({"match_coef": 0.1, "frozen_models": ("a",), "active_set": "global",
      "decoder_update": "all", "schedule": "global"},
     "config: match_coef pulls new models towards frozen ones: it needs frozen_models (usae "
     "train --extend) and active_set=source"),
    ({"matryoshka": (4, 16)},
     "config: matryoshka prefixes must be smaller than the 16 concepts, got [4, 16]"),
])
def test_run_config_refuses_combinations_across_sections(train, message):
    with exactly(message):
        _run(**train)


def test_frozen_models_refuse_a_shared_state_rule_and_allowed_combinations_pass():
    sae = SAEConfig(models=("a", "b"), dims=(4, 4), n_concepts=16, k=2, sparsity="batchtopk")
    with exactly("config: frozen models need a sparsity rule without state (the batchtopk "
                 "rule keeps state that every model shares)"):
        RunConfig(sae=sae, train=TrainConfig(frozen_models=("a",)))
    assert RunConfig(sae=sae, train=TrainConfig()).sae.sparsity == "batchtopk"
    assert _run(frozen_models=("a", "b"), match_coef=0.5).train.match_coef == 0.5
    assert _run(matryoshka=(4, 15)).train.matryoshka == (4, 15)
    empty = RunConfig(sae=SAEConfig(), train=TrainConfig(matryoshka=(4096,), frozen_models=()))
    assert empty.train.matryoshka == (4096,)  # no models yet: nothing to check against


def test_from_json_fills_what_older_runs_lack_and_names_what_breaks():
    cfg = RunConfig.from_json({"sae": {"models": ["a"], "dims": [4], "k": 2}})
    assert cfg.train == TrainConfig() and cfg.preset == "custom"
    assert cfg.sae.models == ("a",) and cfg.sae.dims == (4,)
    with exactly("config.json is malformed: 'sae'"):
        RunConfig.from_json({"train": {}})
    with pytest.raises(UsaeError, match="^config: unknown TrainConfig key"):
        RunConfig.from_json({"sae": {}, "train": {"lr_max": 1}})


def test_from_dict_names_the_key_whose_value_is_wrong():
    with exactly("config: k='many' is not a valid int"):
        from_dict(SAEConfig, {"k": "many"})


def test_from_dict_names_the_unknown_keys_and_every_known_one():
    known = sorted(f.name for f in dataclasses.fields(SAEConfig))
    with exactly(f"config: unknown SAEConfig key(s) ['kk', 'nn']; known keys: {known}"):
        from_dict(SAEConfig, {"nn": 1, "k": 2, "kk": 3})
    assert from_dict(SAEConfig, {"models": ["a"], "dims": ["4"], "k": "3"}) == \
        SAEConfig(models=("a",), dims=(4,), k=3)


@pytest.mark.parametrize("key, value, want", [
    ("matryoshka", "256,1024", (256, 1024)), ("matryoshka", [8, "16"], (8, 16)),
    ("matryoshka", (), ()), ("frozen_models", "a,b", ("a", "b")),
    ("shuffle_pairing", "TRUE", True), ("shuffle_pairing", "yes", True),
    ("shuffle_pairing", "On", True), ("shuffle_pairing", "1", True),
    ("shuffle_pairing", "false", False), ("shuffle_pairing", "No", False),
    ("shuffle_pairing", "off", False), ("shuffle_pairing", "0", False),
    ("shuffle_pairing", 1, True), ("shuffle_pairing", 0, False),
    ("k", 3.0, 3), ("k", "12", 12), ("dead_after_tokens", "1e6", 1_000_000),
    ("dead_after_tokens", "2E3", 2000), ("lr", "3e-3", 0.003), ("lr", 1, 1.0),
    ("device", "cuda", "cuda"), ("unknown_key", "as is", "as is"),
])
def test_values_take_their_fields_type(key, value, want):
    got = key_value(key, value)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("key, value, message", [
    ("shuffle_pairing", "maybe", "config: shuffle_pairing='maybe' is not a valid bool"),
    ("k", 3.5, "config: k=3.5 is not a valid int"),
    ("k", "2.5e0", "config: k='2.5e0' is not a valid int"),
    ("k", "four", "config: k='four' is not a valid int"),
    ("lr", "fast", "config: lr='fast' is not a valid float"),
    ("matryoshka", "8,x", "config: matryoshka='8,x' is not a valid comma-separated list of "
     "int"),
    ("k", None, "config: k=None is not a valid int"),
])
def test_a_value_that_is_not_its_fields_type_is_refused(key, value, message):
    with exactly(message):
        key_value(key, value)


def test_split_overrides_routes_each_key_and_refuses_unknown_ones():
    assert split_overrides({"k": 1, "lr": 2, "encoder": "linear", "seed": 3}) == \
        ({"k": 1, "encoder": "linear"}, {"lr": 2, "seed": 3})
    assert split_overrides({}) == ({}, {})
    with pytest.raises(UsaeError, match=r"^config: unknown key 'kk'; known keys: \['active_set', "):
        split_overrides({"k": 1, "kk": 2})


def test_parse_set_splits_at_the_first_equals_and_strips():
    assert parse_set([" k = 4 ", "device=cuda:0", "note=a=b"]) == \
        {"k": "4", "device": "cuda:0", "note": "a=b"}
    assert parse_set([]) == {}
    with exactly("--set expects key=value, got 'k4'"):
        parse_set(["k4"])
    for key in ("models", " dims"):
        with exactly(f"--set {key.strip()}=...: models and dims come from the store, they "
                     "cannot be set"):
            parse_set([f"{key}=x"])


def test_config_files_flat_nested_or_a_runs_own(tmp_path):
    (tmp_path / "flat.json").write_text(json.dumps({"k": 3, "lr": 0.1}))
    assert load_config_file(str(tmp_path / "flat.json")) == {"k": 3, "lr": 0.1}
    run = {"sae": {"models": ["a"], "dims": [4], "k": 2}, "train": {"lr": 0.5},
           "preset": "fast", "store": "/s", "status": {"step": 3}, "models": ["x"]}
    (tmp_path / "config.json").write_text(json.dumps(run))
    assert load_config_file(tmp_path / "config.json") == {"k": 2, "lr": 0.5}
    (tmp_path / "odd.json").write_text(json.dumps({"sae": 3, "train": {"seed": 1}}))
    assert load_config_file(tmp_path / "odd.json") == {"sae": 3, "seed": 1}
    (tmp_path / "empty.yml").write_text("")
    assert load_config_file(tmp_path / "empty.yml") == {}


def test_config_files_that_cannot_be_used_say_why(tmp_path):
    with exactly(f"cannot read config {tmp_path / 'none.json'}: No such file or directory"):
        load_config_file(tmp_path / "none.json")
    (tmp_path / "list.yaml").write_text("- k\n- 3\n")
    with exactly(f"config {tmp_path / 'list.yaml'} must hold a mapping of keys to values"):
        load_config_file(tmp_path / "list.yaml")
    (tmp_path / "bad.yml").write_text("k: [\n")
    with pytest.raises(UsaeError, match=r"^config .*bad\.yml is not valid yml: "):
        load_config_file(tmp_path / "bad.yml")
    (tmp_path / "noext").write_text("{")
    with pytest.raises(UsaeError, match=r"^config .*noext is not valid JSON: "):
        load_config_file(tmp_path / "noext")


def test_resolve_applies_the_preset_then_the_overrides():
    fast = resolve(("a", "b"), ("6", 4.0), "fast", {"lr": 1e-4, "k": 4})
    assert fast.preset == "fast" and fast.sae.dims == (6, 4) and fast.sae.models == ("a", "b")
    assert fast.train.lr == 1e-4  # the override beats the preset's 3e-3
    assert fast.train.decoder_update == "all" and fast.sae.sparsity == "energy"  # the preset's
    assert resolve(("a",), (4,)).preset == "paper"
    assert resolve(("a",), (4,), "paper", None) == resolve(("a",), (4,), "paper", {})
    with exactly("unknown preset 'fastest'; choose one of ['best', 'demo', 'fast', 'paper']"):
        resolve(("a",), (4,), "fastest")


def test_with_train_changes_only_the_training_section():
    cfg = resolve(("a",), (4,), "best")
    changed = with_train(cfg, max_steps=9, device="cuda")
    assert changed.train == dataclasses.replace(cfg.train, max_steps=9, device="cuda")
    assert changed.sae == cfg.sae and changed.preset == "best" and cfg.train.max_steps == 0
