"""The ``usae`` command: argument parsing generated from the option dataclasses.

Flags and defaults of ``cache``, ``eval`` and ``explore`` come from ``usae.options``, those of
``train`` from ``usae.config``; every ``--help`` shows the defaults. Handlers live in
``usae.commands`` (one API call each). Every user mistake ends as one line,
``usae <command>: error: <what> — <what to do>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Iterator

from usae import __version__
from usae.config import DATA_KEYS, TRAIN_PRESETS
from usae.errors import UsaeError
from usae.options import STORE_KEEPS


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps epilogs as written and shows every default (unless the help already says it or
    there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or \
                isinstance(action.default, bool) or \
                action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _presets_help() -> str:
    from usae.config import TRAIN_PRESETS

    lines = ["presets (each key a preset changes from the paper's defaults):"]
    for name, keys in TRAIN_PRESETS.items():
        lines.append(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in keys.items())
                                      or "the paper's defaults"))
    return "\n".join(lines)


# ---- the commands, as data: each one's help, its own arguments and its option classes -----
class Arg:
    """One hand-written argument: argparse's flags and keywords, as given."""

    def __init__(self, *flags: str, **kwargs: Any) -> None:
        self.flags, self.kwargs = flags, kwargs


@dataclass(frozen=True)
class Options:
    """The flags of option dataclasses (``usae.options.add_arguments``; ``"module:Class"``,
    imported when the parser is built), in an argument group when ``title`` is given."""

    classes: tuple[str, ...]
    title: str | None = None
    description: str | None = None
    unset: bool = False
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """A command (or a ``store`` subcommand): its one-line help, its arguments in ``--help``
    order, and an epilog (``{presets}`` stands for the presets' list)."""

    name: str
    help: str
    args: tuple[Arg | Options, ...] = ()
    epilog: str | None = None
    subcommands: tuple["Command", ...] = ()


CACHE_OPTIONS = "usae.options:CacheOptions"
# training keys that already have a flag of their own in `usae train`
OWN_FLAGS = ("max_steps", "device")

_CODEC = {"encode": ("raw activations (N, d) -> codes (N, n)", "--input"),
          "decode": ("codes (N, n) -> raw activations of one model (N, d)", "--codes")}

COMMANDS: tuple[Command, ...] = (
    Command("demo", "offline end-to-end demo on real pretrained CNNs and photos", (
        Arg("--out", default="demo-output", help="output folder"),
        Arg("--images", type=int, default=320, help="number of training crops"),
        Arg("--steps", type=int, default=0, help="training steps (0: the demo default)"),
        Arg("--models", default="demo", help="model specs or the 'demo' preset"),
        Arg("--quick", action="store_true", help="tiny sizes, for smoke tests"))),
    Command("cache", "extract activations of several models into a store", (
        Arg("--models", required=True, help="SPEC[,SPEC...] or a preset: paper, demo"),
        Arg("--images", required=True, help="folder of images (class subfolders and "
            "train/val levels allowed) or a text file listing image paths"),
        Arg("--out", required=True, help="store folder; re-running resumes"),
        Options((CACHE_OPTIONS,))), epilog="model specs: see README (presets: paper, demo)"),
    Command("store", "inspect or import activation stores", subcommands=(
        Command("info", "print the store's models, images and splits as JSON",
                (Arg("store"),)),
        Command("merge", "join the shard stores of `usae cache --shard-dir` into one store", (
            Arg("shards", nargs="+", help="the shard folders (shard-R-of-N), any order"),
            Arg("--out", required=True, help="the merged store's folder"),
            Arg("--force", action="store_true", help="replace --out if it holds anything"))),
        Command("add-model", "add models to a finished store, for exactly its images (order, "
                "splits and token grid kept; the other models' files untouched)", (
                    Arg("store"),
                    Arg("--models", required=True, help="SPEC[,SPEC...] of the new models"),
                    Options((CACHE_OPTIONS,), skip=STORE_KEEPS),
                    Arg("--no-progress", action="store_true", help="no progress bar"))),
        Command("import-npz", "import the reference's per-image .npz cache", (
            Arg("src", help="folder tree of <image>_combined.npz or <image>_<NAME>.npz"),
            Arg("--out", required=True),
            Arg("--models", required=True, help="NAME[,NAME...]"),
            Arg("--split", default=None, help="split the images go to (default: a seeded "
                "10%% val)"),
            Arg("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                help="stored precision"))))),
    Command("train", "train a universal SAE on a store, or on images streamed through the "
            "backbones", (
                Arg("--store", help="the activation store to train on"),
                Arg("--images", help="instead of --store: a folder or list of images whose "
                    "activations are computed on the fly (needs --models)"),
                Arg("--models", help="with --images: SPEC[,SPEC...] or a preset (paper, demo)"),
                Arg("--out", required=True, help="run folder"),
                Arg("--config", help="JSON or YAML file of config keys"),
                Arg("--preset", default=None, choices=sorted(TRAIN_PRESETS),
                    help="paper: exactly the reference's rule (default: paper; with --resume, "
                    "the run's own preset, and another one is refused)"),
                Arg("--max-steps", type=int, default=None, help="stop after N steps "
                    "(default: the config's max_steps, else epochs)"),
                Arg("--resume", action="store_true", help="continue from RUN's checkpoint"),
                Arg("--force", action="store_true", help="replace a run already in --out"),
                Arg("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="set one training key (repeatable); the same as its flag below"),
                Arg("--split", default="train", help="training split"),
                Arg("--device", default=None, help="cpu or cuda (default: the config's)"),
                Arg("--independent", action="store_true",
                    help="train one ordinary TopK SAE per model instead (control)"),
                Arg("--extend", default=None, metavar="RUN", help="add the store's models that "
                    "RUN lacks (usae store add-model) to RUN's concept space: RUN's weights are "
                    "copied and frozen, only the new models train (RUN may be hf://...)"),
                Arg("--finetune", action="store_true", help="with --extend RUN (a run of every "
                    "model of the store, e.g. an extended one): copy all its weights and train "
                    "them all; OUT/concept_drift.json says how far each model's concepts "
                    "moved"),
                Arg("--no-progress", action="store_true", help="no progress bar"),
                Options(("usae.options:StreamOptions",),
                        title="with --images (as usae cache has them)", unset=True),
                Options(("usae.config:SAEConfig", "usae.config:TrainConfig"),
                        title="training keys", description="Each is also --set KEY=VALUE and a "
                        "key of --config FILE. Unset, a key takes the preset's value, else the "
                        "default shown (the paper's).", unset=True,
                        skip=DATA_KEYS + OWN_FLAGS)), epilog="{presets}"),
    *(Command(name, what, (
        Arg("run"),
        Arg("--model", required=True),
        Arg(flag, required=True, dest="input", help=".npy file"),
        Arg("--out", required=True, help=".npy file (float32)"),
        Arg("--device", default="cpu", help="cpu or cuda[:i]"))) for name, (what, flag)
      in _CODEC.items()),
    Command("eval", "cross-model R2, universality metrics and plots", (
        Arg("run"),
        Arg("--store", required=True),
        Arg("--out", required=True),
        Options(("usae.options:EvalOptions",)),
        Arg("--independent", default=None, help="run folder of independent SAEs to match "
            "against (Hungarian on cosine)"),
        Arg("--compare", nargs="*", default=None, metavar="RUN", help="other runs (the "
            "shuffled-pairing control, training variants) to evaluate on the same split, "
            "reported beside this one"),
        Arg("--truth", default=None, metavar="DIR", help="a `usae synth` folder: score the run "
            "against its known features (report.json's truth section)"),
        Arg("--force", action="store_true", help="replace a non-empty --out"))),
    Command("explore", "write a static concept explorer", (
        Arg("run"),
        Arg("--store", required=True),
        Arg("--out", required=True),
        Arg("--eval", default=None, help="an eval folder to reuse (default: evaluate the run "
            "into OUT/eval)"),
        Options(("usae.options:ExploreOptions",)),
        Arg("--force", action="store_true", help="replace a non-empty --out"))),
    Command("cam", "coordinated activation maximization: one image per model and concept", (
        Arg("run"),
        Arg("--store", required=True, help="the store the run was trained on"),
        Arg("--concept", default=None, help="K[,K...]: these concepts"),
        Arg("--top", type=int, default=None, help="the N most energetic universal concepts "
            "(from --eval; without it, from one eval of the run on every image, kept in "
            "OUT/ranking-eval and reused)"),
        Arg("--eval", default=None, help="an eval folder of this run (ranking and top natural "
            "images)"),
        Arg("--out", default=None, help="output folder (default: RUN/cam)"),
        Options(("usae.options:CamOptions",))),
        epilog="On a 2-core CPU: --steps 64 --crops 1 (the demo's settings, about 8 s per "
        "model and concept); the defaults suit a GPU."),
    Command("concepts", "print concepts of an eval in the terminal", (
        Arg("run", help="the run (used to check the eval belongs to it)"),
        Arg("--eval", required=True, help="an eval folder of this run"),
        Arg("--store", default=None, help="the store, to print top image paths"),
        Arg("--top", type=int, default=10, help="how many concepts, by energy"),
        Arg("--concept", default=None, help="K[,K...]: these concepts instead"),
        Arg("--universal", action="store_true", help="only universal concepts"),
        Arg("--images", type=int, default=3, help="top images per concept"),
        Arg("--json", action="store_true", help="print JSON instead of a table"))),
    Command("push", "share a run on the Hugging Face Hub with a generated model card", (
        Arg("run"),
        Arg("repo_id", metavar="REPO_ID", help="OWNER/NAME on the Hub"),
        Arg("--eval", default=None, help="an eval folder of this run to share too"),
        Arg("--private", action="store_true", help="create the repository private"),
        Arg("--dry-run", action="store_true", help="write RUN/README.md and list the files, "
            "without any network"),
        Arg("--force", action="store_true", help="replace a RUN/README.md that usae did not "
            "write"))),
    Command("serve", "serve an explorer folder on 127.0.0.1", (
        Arg("dir"),
        Arg("--port", type=int, default=8000, help="TCP port (0: any free port)"))),
    Command("synth", "write a store of synthetic models with known shared, partly shared and "
            "model-specific features, and the truth beside it", (
                Arg("--out", required=True, help="folder for store/, truth.safetensors and "
                    "truth.json"),
                Options(("usae.analysis.synth:SynthOptions",)),
                Arg("--force", action="store_true", help="replace a non-empty --out")),
            epilog="Then: usae train --store DIR/store --out RUN, and usae eval RUN --store "
            "DIR/store --out EVAL --truth DIR"),
    Command("import-reference", "convert the paper's released checkpoints", (
        Arg("config", help="the reference YAML (model_zoo with checkpoint_path...)"),
        Arg("--out", required=True))),
)


def _option_class(path: str) -> type:
    module, name = path.split(":")
    return getattr(import_module(module), name)


def _add_command(sub: Any, cmd: Command) -> argparse.ArgumentParser:
    """The parser of ``cmd`` under the subparsers ``sub``."""
    from usae.options import add_arguments

    epilog = cmd.epilog.replace("{presets}", _presets_help()) if cmd.epilog else None
    parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=epilog,
                            formatter_class=_Formatter)
    for item in cmd.args:
        if isinstance(item, Arg):
            parser.add_argument(*item.flags, **item.kwargs)
            continue
        target = parser.add_argument_group(item.title, item.description) if item.title else \
            parser
        for path in item.classes:
            add_arguments(target, _option_class(path), unset=item.unset, skip=item.skip)
    if cmd.subcommands:
        nested = parser.add_subparsers(dest=f"{cmd.name}_command",
                                       metavar=f"{cmd.name.upper()}_COMMAND")
        for child in cmd.subcommands:
            _add_command(nested, child)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``usae`` parser: one subcommand per entry of ``COMMANDS``."""
    p = argparse.ArgumentParser(prog="usae", description="Universal Sparse Autoencoders: one "
                                "sparse concept space shared by several vision models.")
    p.add_argument("--version", action="version", version=f"usae {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        _add_command(sub, cmd)
    return p


def output_folders(args: argparse.Namespace) -> list[str]:
    """The folders a command writes, each held under a lock while it runs (``usae.locks``):
    an output folder holds one command's output at a time."""
    cmd = args.command
    if cmd == "store":
        if args.store_command == "add-model":
            return [args.store]
        return [args.out] if args.store_command in ("merge", "import-npz") else []
    if cmd in ("cache", "train", "eval", "explore", "demo", "import-reference", "synth"):
        return [args.out]
    if cmd == "cam":
        return [args.out or os.path.join(args.run, "cam")] if "://" not in args.run or \
            args.out else []
    if cmd == "push":
        return [] if "://" in args.run else [args.run]
    return []  # encode/decode write one file atomically; serve, concepts write nothing


def _run(handler, args: argparse.Namespace) -> int:
    from usae.locks import output_lock

    folders = output_folders(args)
    if folders:
        from usae.distributed import is_main_process
        from usae.locks import check_not_held_by_another_job

        # under torchrun, rank 0 holds the lock for the whole job (the other ranks write only
        # what rank 0 has claimed); the others refuse another job's lock as rank 0 will
        if not is_main_process():
            for folder in folders:
                check_not_held_by_another_job(folder)
            folders = []
    with output_lock(*folders), _threads(args.command):
        return int(handler(args) or 0)


# not cache: a re-run after a kill must write the same bytes, so it keeps one thread count
COMPUTE_COMMANDS = ("train", "eval", "explore", "cam", "demo", "encode", "decode")


@contextlib.contextmanager
def _threads(command: str) -> Iterator[None]:
    """Fewer torch threads when other processes keep cores busy (``usae.threads``), for the
    commands that compute; the previous count is restored afterwards (for in-process use)."""
    if command not in COMPUTE_COMMANDS:
        yield
        return
    import torch

    from usae.threads import choose_threads

    before = torch.get_num_threads()
    try:
        choose_threads()
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not args.command:
        parser.print_help()
        return 0
    try:
        from usae import commands

        return _run(getattr(commands, "cmd_" + args.command.replace("-", "_")), args)
    except UsaeError as err:
        print(f"usae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `usae store info S | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as err:
        detail = str(err) or ("re-run the same command to resume" if output_folders(args)
                              else "nothing was written")
        print(f"usae {args.command}: interrupted: {detail}", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``usae`` command and ``python -m usae``: ``main``, then the exit. Ctrl-C before a
    command starts (while torch imports) ends quietly with status 130. After a lost torchrun
    peer, gloo's threads still wait on it and the interpreter's teardown aborts (SIGABRT)
    instead of exiting with the error's status, so the process ends at once."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("usae: interrupted", file=sys.stderr)
        sys.exit(130)
    distributed = sys.modules.get("usae.distributed")  # not imported: no peer to lose
    if distributed is not None and distributed.peer_lost():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
