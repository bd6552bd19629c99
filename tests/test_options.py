"""The option mechanism itself (``usae.options``): fields with limits, their validation, and
the flags generated from them, checked on small dataclasses made here, against what argparse
and the dataclass definitions say by themselves."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

import pytest

from usae.errors import UsaeError
from usae.options import (
    CacheOptions,
    CamOptions,
    EvalOptions,
    add_arguments,
    check_device,
    from_args,
    given_args,
    merged,
    opt,
    validate,
)


@dataclass(frozen=True)
class Toy:
    """Every kind of limit once, and every kind of flag."""

    size: int = opt("Side in pixels.", 8, minimum=2, maximum=64)
    rate: float = opt("A rate (25-100% of it).", 0.5, below=1.0)
    mode: str = opt("The mode.", "a", choices=("a", "b"))
    plots: bool = opt("Write plots.", True)
    quiet: bool = opt("Say less.", False)
    shape: tuple[int, ...] = opt("A shape.", (3, 4))

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ToyKeys:
    """A class whose errors name config keys, as the training config's do."""

    OPTION_NAMES = "key"
    batch_size: int = opt("Tokens per step.", 4, minimum=1)
    device: str = opt("Where it was trained.", "cuda:3")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ToyDevice:
    batch_size: int = opt("Images per batch.", 4, minimum=1)
    device: str = opt("cpu or cuda[:i].", "cpu")

    def __post_init__(self) -> None:
        validate(self)


def test_opt_keeps_the_default_and_every_limit_under_its_name():
    f = {f.name: f for f in fields(Toy)}
    assert Toy().size == 8 and Toy().rate == 0.5 and Toy().shape == (3, 4)
    assert dict(f["size"].metadata) == {"help": "Side in pixels.", "choices": None, "min": 2,
                                        "max": 64, "below": None}
    assert f["rate"].metadata["below"] == 1.0
    assert f["mode"].metadata["choices"] == ("a", "b")


@pytest.mark.parametrize("changes, message", [
    ({"size": 1}, "--size must be at least 2, got 1"),
    ({"size": 65}, "--size must be at most 64, got 65"),
    ({"rate": 1.0}, "--rate must be less than 1.0, got 1.0"),
    ({"rate": math.nan}, "--rate must be a finite number, got nan"),
    ({"rate": -math.inf}, "--rate must be a finite number, got -inf"),
    ({"mode": "c"}, "--mode must be one of ['a', 'b'], got 'c'"),
])
def test_each_limit_fails_with_the_flag_named(changes, message):
    with pytest.raises(UsaeError) as err:
        Toy(**changes)
    assert str(err.value) == message


def test_limits_are_inclusive_where_they_say_so():
    # "at least" and "at most" admit the limit itself; "less than" does not (above)
    assert Toy(size=2).size == 2 and Toy(size=64).size == 64
    assert Toy(rate=0.999).rate == 0.999 and Toy(mode="b").mode == "b"


def test_a_flag_name_has_dashes_and_a_key_name_keeps_its_underscores():
    with pytest.raises(UsaeError, match=r"^config: batch_size must be at least 1, got 0$"):
        ToyKeys(batch_size=0)
    with pytest.raises(UsaeError, match=r"^--batch-size must be at least 1, got 0$"):
        ToyDevice(batch_size=0)


def test_a_config_of_keys_names_a_device_without_checking_it_is_here():
    # a run trained on cuda:3 must read its config on this CPU machine; options must not
    assert ToyKeys().device == "cuda:3"
    with pytest.raises(UsaeError, match="CUDA is not available"):
        ToyDevice(device="cuda:3")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_check_device_takes_cpu_and_cuda_forms(device, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device(device)  # no error


@pytest.mark.parametrize("device", ["gpu", "CUDA", "CUDA:0", "cudax", "cuda0", "cpu:0", ""])
def test_check_device_rejects_other_spellings(device, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsaeError) as err:
        check_device(device)
    assert str(err.value) == f"--device must be cpu or cuda[:i], got {device!r}"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_check_device_says_when_cuda_is_missing(device, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsaeError) as err:
        check_device(device)
    assert str(err.value) == (f"--device {device} was requested but CUDA is not available — "
                              "use --device cpu")
    check_device("cpu")  # never needs CUDA


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, Toy, **kwargs)
    return parser


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_flags_set_their_own_field_with_its_type_and_default():
    args = _parser(skip=("shape",)).parse_args([])
    assert (args.size, args.rate, args.mode, args.plots, args.quiet) == (8, 0.5, "a", True,
                                                                          False)
    args = _parser(skip=("shape",)).parse_args(
        ["--size", "16", "--rate", "0.25", "--mode", "b", "--no-plots", "--quiet"])
    assert (args.size, args.rate, args.mode, args.plots, args.quiet) == (16, 0.25, "b", False,
                                                                          True)
    assert type(args.size) is int and type(args.rate) is float
    assert from_args(Toy, argparse.Namespace(**vars(args), shape=(1,))) == \
        Toy(size=16, rate=0.25, mode="b", plots=False, quiet=True, shape=(1,))


def test_flag_help_is_the_field_help_and_an_on_switch_says_how_to_turn_it_off():
    parser = _parser(skip=("shape",))
    assert _action(parser, "--size").help == "Side in pixels."
    assert _action(parser, "--quiet").help == "Say less."
    assert _action(parser, "--no-plots").help == \
        "Write plots (default: on; --no-plots turns it off)."
    assert _action(parser, "--no-plots").dest == "plots"
    assert "--plots" not in parser._option_string_actions  # only the way to turn it off
    # a '%' in a help text is escaped for argparse, which prints it once
    assert _action(parser, "--rate").help == "A rate (25-100%% of it)."
    assert "(25-100% of it)" in parser.format_help() and "%%" not in parser.format_help()


def test_skip_leaves_the_field_out():
    parser = _parser(skip=("size", "mode"))
    assert "--size" not in parser._option_string_actions
    assert "--mode" not in parser._option_string_actions
    assert "--rate" in parser._option_string_actions


def test_unset_flags_default_to_none_and_show_the_real_default():
    parser = _parser(unset=True)
    args = parser.parse_args([])
    assert all(getattr(args, f.name) is None for f in fields(Toy))
    assert given_args(Toy, args) == {}
    size, shape, plots = (_action(parser, f) for f in ("--size", "--shape", "--plots"))
    assert size.help == "Side in pixels. [default: 8]" and size.metavar == "SIZE"
    assert shape.help == "A shape. [default: 3,4]" and shape.metavar == "SHAPE"
    assert plots.help == "Write plots. [default: True]" and plots.metavar is None
    # a '%' is escaped for argparse, and the help prints it once
    assert _action(parser, "--rate").help == "A rate (25-100%% of it). [default: 0.5]"
    assert "(25-100% of it)" in parser.format_help() and "%%" not in parser.format_help()
    args = parser.parse_args(["--size", "16", "--no-plots", "--shape", "5,6", "--rate", "0.1"])
    assert given_args(Toy, args) == {"size": 16, "plots": False, "shape": "5,6", "rate": 0.1}
    assert parser.parse_args(["--plots"]).plots is True


def test_merged_applies_changes_over_a_base_or_the_defaults():
    assert merged(Toy, None, {"size": 16}) == Toy(size=16)
    assert merged(Toy, Toy(mode="b"), {"size": 16}) == Toy(size=16, mode="b")
    with pytest.raises(TypeError, match=r"^Toy has no option\(s\) \['colour', 'weight'\]$"):
        merged(Toy, None, {"weight": 1, "colour": 2, "size": 3})
    with pytest.raises(UsaeError, match="--size must be at least 2"):
        merged(Toy, None, {"size": 0})


@pytest.mark.parametrize("cls", [CacheOptions, EvalOptions, CamOptions])
def test_every_command_flag_comes_from_its_field(cls):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    defaults = vars(parser.parse_args([]))
    assert defaults == {f.name: f.default for f in fields(cls)}
    assert from_args(cls, parser.parse_args([])) == cls()


@pytest.mark.parametrize("cores, device, workers", [
    (1, "cpu", 1), (4, "cpu", 1), (5, "cpu", 1), (8, "cpu", 2), (64, "cpu", 16),
    (1, "cuda", 1), (3, "cuda:0", 1), (8, "cuda", 6), (18, "cuda:1", 16), (64, "cuda", 16),
])
def test_automatic_workers_follow_the_rule_in_the_help(cores, device, workers, monkeypatch):
    import os

    from usae.options import AUTOMATIC_WORKERS, ImageDataOptions, default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers(device) == workers
    assert ImageDataOptions().workers == AUTOMATIC_WORKERS == -1
    assert ImageDataOptions().resolved_workers(device) == workers
    assert ImageDataOptions(workers=3).resolved_workers(device) == 3
    assert ImageDataOptions(workers=0).resolved_workers(device) == 0
