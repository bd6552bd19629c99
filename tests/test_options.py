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


def make_toy() -> type:
    """Every kind of limit once, and every kind of flag. Made when a test runs, not at import,
    so that ``opt`` itself runs under the test (mutation testing activates a mutant per test)."""

    @dataclass(frozen=True)
    class Toy:
        max_side: int = opt("Side in pixels.", 8, minimum=2, maximum=64)
        rate: float = opt("A rate (25-100% of it).", 0.5, below=1.0)
        mode: str = opt("The mode.", "a", choices=("a", "b"))
        make_plots: bool = opt("Write plots.", True)
        quiet: bool = opt("Say less.", False)
        shape: tuple[int, ...] = opt("A shape.", (3, 4))
        pattern: str = opt("A file name pattern", "%d.png")
        extra: int = 0  # a field without opt(): no help, no limits

        def __post_init__(self) -> None:
            validate(self)

    return Toy


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
    toy = make_toy()
    f = {f.name: f for f in fields(toy)}
    assert toy().max_side == 8 and toy().rate == 0.5 and toy().shape == (3, 4)
    assert dict(f["max_side"].metadata) == {"help": "Side in pixels.", "choices": None,
                                            "min": 2, "max": 64, "below": None}
    assert dict(f["rate"].metadata) == {"help": "A rate (25-100% of it).", "choices": None,
                                        "min": None, "max": None, "below": 1.0}
    assert dict(f["mode"].metadata) == {"help": "The mode.", "choices": ("a", "b"),
                                        "min": None, "max": None, "below": None}


@pytest.mark.parametrize("changes, message", [
    ({"max_side": 1}, "--max-side must be at least 2, got 1"),
    ({"max_side": 65}, "--max-side must be at most 64, got 65"),
    ({"rate": 1.0}, "--rate must be less than 1.0, got 1.0"),
    ({"rate": math.nan}, "--rate must be a finite number, got nan"),
    ({"rate": -math.inf}, "--rate must be a finite number, got -inf"),
    ({"mode": "c"}, "--mode must be one of ['a', 'b'], got 'c'"),
])
def test_each_limit_fails_with_the_flag_named(changes, message):
    with pytest.raises(UsaeError) as err:
        make_toy()(**changes)
    assert str(err.value) == message


def test_limits_are_inclusive_where_they_say_so():
    # "at least" and "at most" admit the limit itself; "less than" does not (above)
    toy = make_toy()
    assert toy(max_side=2).max_side == 2 and toy(max_side=64).max_side == 64
    assert toy(rate=0.999).rate == 0.999 and toy(mode="b").mode == "b"


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


def _parser(toy, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, toy, **kwargs)
    return parser


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_flags_set_their_own_field_with_its_type_and_default():
    toy = make_toy()
    parser = _parser(toy, skip=("shape",))
    args = parser.parse_args([])
    assert (args.max_side, args.rate, args.mode, args.make_plots, args.quiet, args.extra) == \
        (8, 0.5, "a", True, False, 0)
    args = parser.parse_args(["--max-side", "16", "--rate", "0.25", "--mode", "b",
                              "--no-make-plots", "--quiet", "--extra", "2"])
    assert (args.max_side, args.rate, args.mode, args.make_plots, args.quiet, args.extra) == \
        (16, 0.25, "b", False, True, 2)
    assert type(args.max_side) is int and type(args.rate) is float
    assert from_args(toy, argparse.Namespace(**vars(args), shape=(1,))) == \
        toy(max_side=16, rate=0.25, mode="b", make_plots=False, quiet=True, shape=(1,), extra=2)


def test_flag_help_is_the_field_help_and_an_on_switch_says_how_to_turn_it_off():
    parser = _parser(make_toy(), skip=("shape",))
    assert _action(parser, "--max-side").help == "Side in pixels."
    assert _action(parser, "--quiet").help == "Say less."
    assert _action(parser, "--extra").help == ""  # a field without help text
    assert _action(parser, "--no-make-plots").help == \
        "Write plots (default: on; --no-make-plots turns it off)."
    assert _action(parser, "--no-make-plots").dest == "make_plots"
    assert "--make-plots" not in parser._option_string_actions  # only the way to turn it off
    # a '%' in a help text is escaped for argparse, which prints it once
    assert _action(parser, "--rate").help == "A rate (25-100%% of it)."
    assert "(25-100% of it)" in parser.format_help() and "%%" not in parser.format_help()


def test_an_on_switch_whose_help_has_no_full_stop_keeps_its_last_letter():
    @dataclass(frozen=True)
    class Switch:
        sharp_edges: bool = opt("Keep sharp edges", True)

    parser = _parser(Switch)
    assert _action(parser, "--no-sharp-edges").help == \
        "Keep sharp edges (default: on; --no-sharp-edges turns it off)."


def test_skip_leaves_the_field_out():
    parser = _parser(make_toy(), skip=("max_side", "mode"))
    assert "--max-side" not in parser._option_string_actions
    assert "--mode" not in parser._option_string_actions
    assert "--rate" in parser._option_string_actions


def test_unset_flags_default_to_none_and_show_the_real_default():
    toy = make_toy()
    parser = _parser(toy, unset=True)
    args = parser.parse_args([])
    assert all(getattr(args, f.name) is None for f in fields(toy))
    assert given_args(toy, args) == {}
    side, shape, plots = (_action(parser, f) for f in ("--max-side", "--shape", "--make-plots"))
    assert side.help == "Side in pixels. [default: 8]" and side.metavar == "MAX_SIDE"
    assert shape.help == "A shape. [default: 3,4]" and shape.metavar == "SHAPE"
    assert plots.help == "Write plots. [default: True]" and plots.metavar is None
    # a '%' is escaped for argparse, in the text and in the default, and printed once
    assert _action(parser, "--rate").help == "A rate (25-100%% of it). [default: 0.5]"
    assert _action(parser, "--pattern").help == "A file name pattern [default: %%d.png]"
    text = parser.format_help()
    assert "(25-100% of it)" in text and "[default: %d.png]" in text and "%%" not in text
    args = parser.parse_args(["--max-side", "16", "--no-make-plots", "--shape", "5,6",
                              "--rate", "0.1"])
    assert given_args(toy, args) == {"max_side": 16, "make_plots": False, "shape": "5,6",
                                     "rate": 0.1}
    assert parser.parse_args(["--make-plots"]).make_plots is True


def test_given_args_reads_only_the_fields_a_parser_has():
    toy = make_toy()
    assert given_args(toy, argparse.Namespace(max_side=3, rate=None, other=1)) == \
        {"max_side": 3}


def test_a_field_without_a_default_has_no_flag_default():
    @dataclass(frozen=True)
    class Required:
        name: str
        size: int = opt("Size.", 3)

    args = _parser(Required).parse_args([])
    assert args.name is None and args.size == 3


def test_merged_applies_changes_over_a_base_or_the_defaults():
    toy = make_toy()
    assert merged(toy, None, {"max_side": 16}) == toy(max_side=16)
    assert merged(toy, toy(mode="b"), {"max_side": 16}) == toy(max_side=16, mode="b")
    with pytest.raises(TypeError, match=r"^Toy has no option\(s\) \['colour', 'weight'\]$"):
        merged(toy, None, {"weight": 1, "colour": 2, "max_side": 3})
    with pytest.raises(UsaeError, match="--max-side must be at least 2"):
        merged(toy, None, {"max_side": 0})


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
    monkeypatch.delattr(os, "sched_getaffinity")  # (macOS has none: the CPU count)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_workers(device) == workers
    assert ImageDataOptions().workers == AUTOMATIC_WORKERS == -1
    assert ImageDataOptions().resolved_workers(device) == workers
    assert ImageDataOptions(workers=3).resolved_workers(device) == 3
    assert ImageDataOptions(workers=0).resolved_workers(device) == 0
