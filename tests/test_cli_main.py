"""usae.cli's machinery in process: the commands table becomes the parser, each command's
output folders are locked, and ``main``/``entry`` turn every ending into one line and an exit
status. (tests/test_cli.py follows each flag into the library.)"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from usae import cli, commands
from usae.config import TRAIN_PRESETS
from usae.errors import UsaeError
from usae.locks import lock_path


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ---- the table becomes the parser -------------------------------------------------------
def test_every_command_of_the_table_is_a_subcommand_with_its_handler():
    subs = _subparsers(cli.build_parser())
    assert list(subs) == [c.name for c in cli.COMMANDS]
    assert list(subs) == ["demo", "cache", "store", "train", "encode", "decode", "eval",
                          "explore", "cam", "concepts", "push", "serve", "synth",
                          "import-reference"]
    for name, parser in subs.items():
        assert callable(getattr(commands, "cmd_" + name.replace("-", "_")))
        assert parser.prog == f"usae {name}"
    store = _subparsers(subs["store"])
    assert list(store) == ["info", "merge", "add-model", "import-npz"]
    assert store["merge"].prog == "usae store merge"


def test_a_command_gets_its_help_description_epilog_and_arguments():
    spec = cli.Command("x", "does x", (cli.Arg("path", help="the path"),
                                       cli.Arg("--n", type=int, default=3, help="how many")),
                       epilog="see {presets}")
    parser = argparse.ArgumentParser(prog="t")
    sub = parser.add_subparsers(dest="command")
    made = cli._add_command(sub, spec)
    assert made.description == "does x" and made.epilog == "see " + cli._presets_help()
    assert isinstance(made.formatter_class, type) and made.formatter_class is cli._Formatter
    assert sub._choices_actions[0].help == "does x"
    args = parser.parse_args(["x", "p", "--n", "5"])
    assert (args.command, args.path, args.n) == ("x", "p", 5)
    assert parser.parse_args(["x", "q"]).n == 3
    plain = cli._add_command(sub, cli.Command("y", "does y"))
    assert plain.epilog is None


def test_options_add_their_fields_in_a_group_or_at_the_top(monkeypatch):
    seen = []
    monkeypatch.setattr("usae.options.add_arguments", lambda target, cls, unset, skip:
                        seen.append((getattr(target, "title", "top"), cls.__name__, unset, skip)))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli._add_command(sub, cli.Command("z", "z", (
        cli.Options(("usae.options:EvalOptions",)),
        cli.Options(("usae.config:SAEConfig", "usae.config:TrainConfig"), title="keys",
                    description="about", unset=True, skip=("lr",)))))
    assert seen == [("top", "EvalOptions", False, ()), ("keys", "SAEConfig", True, ("lr",)),
                    ("keys", "TrainConfig", True, ("lr",))]


def test_subcommands_parse_into_their_own_dest():
    args = cli.build_parser().parse_args(["store", "merge", "a", "b", "--out", "M"])
    assert (args.command, args.store_command, args.shards, args.out) == \
        ("store", "merge", ["a", "b"], "M")
    assert "STORE_COMMAND" in _subparsers(cli.build_parser())["store"].format_usage()


def test_the_top_level_help_names_the_tool_its_switches_and_commands():
    text = " ".join(cli.build_parser().format_help().split())  # (wrapped to the terminal)
    assert text.startswith("usage: usae [-h] [--version] [-v] COMMAND ... Universal Sparse "
                           "Autoencoders: one sparse concept space shared by several vision "
                           "models. positional arguments: COMMAND ")
    assert "-v, --verbose debug logging" in text


def test_the_training_keys_group_explains_itself():
    text = " ".join(_subparsers(cli.build_parser())["train"].format_help().split())
    assert "training keys: Each is also --set KEY=VALUE and a key of --config FILE. Unset, a " \
           "key takes the preset's value, else the default shown (the paper's)." in text
    assert "with --images (as usae cache has them):" in text


def test_option_class_reads_module_and_name():
    from usae.options import CamOptions

    assert cli._option_class("usae.options:CamOptions") is CamOptions


def test_the_presets_help_lists_each_presets_changes():
    lines = cli._presets_help().split("\n")
    assert lines[0] == "presets (each key a preset changes from the paper's defaults):"
    assert lines[1] == "  paper: the paper's defaults"
    for line, (name, keys) in zip(lines[1:], TRAIN_PRESETS.items()):
        assert line.startswith(f"  {name}: ")
        for key, value in keys.items():
            assert f"{key}={value}" in line
    assert len(lines) == 1 + len(TRAIN_PRESETS)
    assert "  best: decoder_update=all" in lines
    fast = next(line for line in lines if line.startswith("  fast: "))
    assert fast == "  fast: " + ", ".join(f"{k}={v}" for k, v in TRAIN_PRESETS["fast"].items())


def test_the_train_parser_skips_the_keys_it_has_no_flag_for():
    from usae.config import DATA_KEYS

    train = _subparsers(cli.build_parser())["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for key in DATA_KEYS:
        assert "--" + key not in flags or key == "models"  # (--models is the image models)
    assert "--dims" not in flags
    assert sorted(a.dest for a in train._actions if "--max-steps" in a.option_strings) == \
        ["max_steps"]
    assert train.get_default("max_steps") is None  # its own flag, not the key's (0)


# ---- the help formatter -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, shows", [
    ({"default": 5, "help": "how many"}, True),
    ({"default": 5, "help": "how many (Default: five)"}, False),
    ({"default": None, "help": "maybe"}, False),
    ({"action": "store_true", "help": "a switch"}, False),
    ({"default": argparse.SUPPRESS, "help": "hidden"}, False),
    ({"default": "x", "help": None}, True),
])
def test_the_formatter_shows_a_default_once(kwargs, shows):
    parser = argparse.ArgumentParser(formatter_class=cli._Formatter)
    action = parser.add_argument("--flag", **kwargs)
    text = cli._Formatter("p")._get_help_string(action)
    own = kwargs.get("help") or ""
    assert text == (own + " (default: %(default)s)" if shows else own)


def test_a_positional_shows_no_default():
    parser = argparse.ArgumentParser(formatter_class=cli._Formatter)
    action = parser.add_argument("path", nargs="?", default="here", help="the path")
    assert cli._Formatter("p")._get_help_string(action) == "the path"


def test_the_formatter_keeps_an_epilog_as_written():
    text = cli._Formatter("p")._fill_text("line one\n  line two", 20, "")
    assert text == "line one\n  line two"


# ---- output folders and their locks -----------------------------------------------------
@pytest.mark.parametrize("argv, folders", [
    (["store", "info", "S"], []),
    (["store", "merge", "a", "--out", "M"], ["M"]),
    (["store", "import-npz", "src", "--out", "N", "--models", "a"], ["N"]),
    (["store", "add-model", "S", "--models", "m"], ["S"]),
    (["store"], []),
    (["demo", "--out", "D"], ["D"]),
    (["cache", "--models", "m", "--images", "I", "--out", "S"], ["S"]),
    (["train", "--store", "S", "--out", "R"], ["R"]),
    (["eval", "R", "--store", "S", "--out", "E"], ["E"]),
    (["explore", "R", "--store", "S", "--out", "X"], ["X"]),
    (["synth", "--out", "Y"], ["Y"]),
    (["import-reference", "c.yaml", "--out", "R"], ["R"]),
    (["cam", "R", "--store", "S", "--top", "1"], [os.path.join("R", "cam")]),
    (["cam", "R", "--store", "S", "--top", "1", "--out", "C"], ["C"]),
    (["cam", "hf://me/r", "--store", "S", "--top", "1"], []),
    (["cam", "hf://me/r", "--store", "S", "--top", "1", "--out", "C"], ["C"]),
    (["push", "R", "me/x"], ["R"]),
    (["push", "hf://me/r", "me/x"], []),
    (["encode", "R", "--model", "m", "--input", "x", "--out", "y"], []),
    (["concepts", "R", "--eval", "E"], []),
    (["serve", "X"], []),
])
def test_output_folders(argv, folders):
    assert cli.output_folders(cli.build_parser().parse_args(argv)) == folders


def test_run_chooses_threads_for_a_compute_command(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr("usae.threads.choose_threads", lambda: chosen.append(1))
    monkeypatch.delenv("RANK", raising=False)
    args = cli.build_parser().parse_args(["encode", "R", "--model", "m", "--input", "x",
                                          "--out", "y"])
    assert cli._run(lambda a: 0, args) == 0 and chosen == [1]


def test_run_holds_the_lock_while_the_handler_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    args = cli.build_parser().parse_args(["synth", "--out", str(tmp_path / "Y")])
    seen = []

    def handler(a):
        holder = json.loads(lock_path(tmp_path / "Y").read_text())
        seen.append((a is args, holder["pid"]))
        return None

    assert cli._run(handler, args) == 0
    assert seen == [(True, os.getpid())] and not lock_path(tmp_path / "Y").exists()
    assert cli._run(lambda a: 3, args) == 3


def test_other_ranks_take_no_lock_but_refuse_another_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1")
    args = cli.build_parser().parse_args(["synth", "--out", str(tmp_path / "Y")])
    taken = []
    assert cli._run(lambda a: taken.append(lock_path(tmp_path / "Y").exists()) or 0, args) == 0
    assert taken == [False]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(tmp_path / "Y").write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "job": "h:2"}))
        with pytest.raises(UsaeError, match="in use by another usae command"):
            cli._run(lambda a: pytest.fail("ran"), args)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("command, computes", [
    ("train", True), ("eval", True), ("explore", True), ("cam", True), ("demo", True),
    ("encode", True), ("decode", True), ("cache", False), ("serve", False), ("store", False),
])
def test_compute_commands_choose_their_threads_and_give_them_back(command, computes,
                                                                  monkeypatch):
    chosen = []
    before = torch.get_num_threads()
    monkeypatch.setattr("usae.threads.choose_threads",
                        lambda: chosen.append(1) or torch.set_num_threads(1))
    try:
        with cli._threads(command):
            inside = torch.get_num_threads()
        assert (chosen == [1]) is computes
        assert torch.get_num_threads() == before
        assert (inside == 1) is (computes or before == 1)
    finally:
        torch.set_num_threads(before)


def test_threads_are_given_back_after_a_failure(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr("usae.threads.choose_threads", lambda: torch.set_num_threads(1))
    try:
        with pytest.raises(RuntimeError):
            with cli._threads("train"):
                raise RuntimeError("failed")
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


# ---- main and entry ---------------------------------------------------------------------
@pytest.fixture
def handler(monkeypatch):
    """``usae serve X``'s handler, replaced by the function the test sets."""
    box = {}
    monkeypatch.setattr(commands, "cmd_serve", lambda args: box["fn"](args))
    monkeypatch.setattr(commands, "cmd_import_reference", lambda args: box["fn"](args))
    return box


def test_main_without_a_command_prints_the_help(capsys):
    assert cli.main([]) == 0
    assert capsys.readouterr().out.startswith("usage: usae ")


def test_main_returns_the_handlers_status(handler):
    handler["fn"] = lambda args: None
    assert cli.main(["serve", "X"]) == 0
    handler["fn"] = lambda args: 4
    assert cli.main(["serve", "X"]) == 4


def test_a_usae_error_is_one_line_with_status_2(handler, capsys):
    def fail(args):
        raise UsaeError("the folder is missing — make it first")

    handler["fn"] = fail
    assert cli.main(["serve", "X"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "usae serve: error: the folder is missing — make it first\n"
    assert captured.out == ""


def test_a_dash_command_finds_its_underscore_handler(handler, tmp_path):
    handler["fn"] = lambda args: 7 if args.config == "c.yaml" else 0
    assert cli.main(["import-reference", "c.yaml", "--out", str(tmp_path / "r")]) == 7


@pytest.mark.parametrize("argv, message, detail", [
    (["serve", "X"], "", "nothing was written"),
    (["import-reference", "c", "--out", "R"], "", "re-run the same command to resume"),
    (["serve", "X"], "stopped at step 3; the checkpoint was kept",
     "stopped at step 3; the checkpoint was kept"),
])
def test_ctrl_c_says_what_was_kept_with_status_130(handler, capsys, tmp_path, argv, message,
                                                   detail, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(args):
        raise KeyboardInterrupt(message) if message else KeyboardInterrupt

    handler["fn"] = interrupted
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == f"usae {argv[0]}: interrupted: {detail}\n"


def test_a_closed_pipe_ends_quietly(handler, monkeypatch):
    def broken(args):
        raise BrokenPipeError

    handler["fn"] = broken
    dup = []
    monkeypatch.setattr(cli.os, "dup2", lambda fd, to: dup.append(("dup2", fd, to)))
    monkeypatch.setattr(cli.os, "open", lambda path, flags: dup.append(("open", path, flags))
                        or 99)
    monkeypatch.setattr(cli.sys, "stdout", type("Out", (), {"fileno": lambda self: 1})())
    assert cli.main(["serve", "X"]) == 0
    # stdout now goes nowhere: no second error when the interpreter flushes it at exit
    assert dup == [("open", os.devnull, os.O_WRONLY), ("dup2", 99, 1)]


def test_verbose_turns_on_debug_logging(handler, monkeypatch):
    seen = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.update(kw))
    handler["fn"] = lambda args: 0
    cli.main(["-v", "serve", "X"])
    assert seen == {"level": logging.DEBUG, "format": "%(message)s"}
    cli.main(["serve", "X"])
    assert seen["level"] == logging.INFO


def test_entry_exits_with_mains_status_and_ctrl_c_quietly(monkeypatch, capsys):
    monkeypatch.setattr(cli, "main", lambda: 3)
    with pytest.raises(SystemExit) as ended:
        cli.entry()
    assert ended.value.code == 3

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    with pytest.raises(SystemExit) as ended:
        cli.entry()
    assert ended.value.code == 130 and capsys.readouterr().err == "usae: interrupted\n"


def test_entry_without_distributed_imported_exits_normally(monkeypatch):
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.delitem(sys.modules, "usae.distributed", raising=False)
    monkeypatch.setattr(cli.os, "_exit", lambda code: pytest.fail("os._exit"))
    with pytest.raises(SystemExit) as ended:
        cli.entry()
    assert ended.value.code == 0


def test_version(capsys):
    from usae import __version__

    with pytest.raises(SystemExit) as ended:
        cli.build_parser().parse_args(["--version"])
    assert ended.value.code == 0 and capsys.readouterr().out == f"usae {__version__}\n"
