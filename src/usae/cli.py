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
from typing import Iterator

from usae import __version__
from usae.errors import UsaeError


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


def _sub(sub, name: str, text: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter,
                          **kwargs)


def _add_demo(sub) -> None:
    s = _sub(sub, "demo", "offline end-to-end demo on real pretrained CNNs and photos")
    s.add_argument("--out", default="demo-output", help="output folder")
    s.add_argument("--images", type=int, default=320, help="number of training crops")
    s.add_argument("--steps", type=int, default=0, help="training steps (0: the demo default)")
    s.add_argument("--models", default="demo", help="model specs or the 'demo' preset")
    s.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")


def _add_cache(sub) -> None:
    from usae.options import CacheOptions, add_arguments

    s = _sub(sub, "cache", "extract activations of several models into a store",
             epilog="model specs: see README (presets: paper, demo)")
    s.add_argument("--models", required=True, help="SPEC[,SPEC...] or a preset: paper, demo")
    s.add_argument("--images", required=True, help="folder of images (class subfolders and "
                   "train/val levels allowed) or a text file listing image paths")
    s.add_argument("--out", required=True, help="store folder; re-running resumes")
    add_arguments(s, CacheOptions)


def _add_store(sub) -> None:
    from usae.options import STORE_KEEPS, CacheOptions, add_arguments

    st = _sub(sub, "store", "inspect or import activation stores")
    ssub = st.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    s = _sub(ssub, "info", "print the store's models, images and splits as JSON")
    s.add_argument("store")
    s = _sub(ssub, "merge", "join the shard stores of `usae cache --shard-dir` into one store")
    s.add_argument("shards", nargs="+", help="the shard folders (shard-R-of-N), any order")
    s.add_argument("--out", required=True, help="the merged store's folder")
    s.add_argument("--force", action="store_true", help="replace --out if it holds anything")
    s = _sub(ssub, "add-model", "add models to a finished store, for exactly its images "
             "(order, splits and token grid kept; the other models' files untouched)")
    s.add_argument("store")
    s.add_argument("--models", required=True, help="SPEC[,SPEC...] of the new models")
    add_arguments(s, CacheOptions, skip=STORE_KEEPS)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = _sub(ssub, "import-npz", "import the reference's per-image .npz cache")
    s.add_argument("src", help="folder tree of <image>_combined.npz or <image>_<NAME>.npz")
    s.add_argument("--out", required=True)
    s.add_argument("--models", required=True, help="NAME[,NAME...]")
    s.add_argument("--split", default=None, help="split the images go to (default: a seeded "
                   "10%% val)")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="stored precision")


# training keys that already have a flag of their own in `usae train`
OWN_FLAGS = ("max_steps", "device")


def _add_train(sub) -> None:
    from usae.config import DATA_KEYS, TRAIN_PRESETS, SAEConfig, TrainConfig
    from usae.options import StreamOptions, add_arguments

    s = _sub(sub, "train", "train a universal SAE on a store, or on images streamed through "
             "the backbones", epilog=_presets_help())
    s.add_argument("--store", help="the activation store to train on")
    s.add_argument("--images", help="instead of --store: a folder or list of images whose "
                   "activations are computed on the fly (needs --models)")
    s.add_argument("--models", help="with --images: SPEC[,SPEC...] or a preset (paper, demo)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--config", help="JSON or YAML file of config keys")
    s.add_argument("--preset", default=None, choices=sorted(TRAIN_PRESETS),
                   help="paper: exactly the reference's rule (default: paper; with --resume, "
                   "the run's own preset, and another one is refused)")
    s.add_argument("--max-steps", type=int, default=None, help="stop after N steps "
                   "(default: the config's max_steps, else epochs)")
    s.add_argument("--resume", action="store_true", help="continue from RUN's checkpoint")
    s.add_argument("--force", action="store_true", help="replace a run already in --out")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set one training key (repeatable); the same as its flag below")
    s.add_argument("--split", default="train", help="training split")
    s.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    s.add_argument("--independent", action="store_true",
                   help="train one ordinary TopK SAE per model instead (control)")
    s.add_argument("--extend", default=None, metavar="RUN", help="add the store's models that "
                   "RUN lacks (usae store add-model) to RUN's concept space: RUN's weights are "
                   "copied and frozen, only the new models train (RUN may be hf://...)")
    s.add_argument("--finetune", action="store_true", help="with --extend RUN (a run of every "
                   "model of the store, e.g. an extended one): copy all its weights and train "
                   "them all; OUT/concept_drift.json says how far each model's concepts moved")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(s.add_argument_group("with --images (as usae cache has them)"),
                  StreamOptions, unset=True)
    group = s.add_argument_group(
        "training keys", "Each is also --set KEY=VALUE and a key of --config FILE. Unset, a key "
        "takes the preset's value, else the default shown (the paper's).")
    for cls in (SAEConfig, TrainConfig):
        add_arguments(group, cls, unset=True, skip=DATA_KEYS + OWN_FLAGS)


def _add_codec(sub) -> None:
    for name, what in (("encode", "raw activations (N, d) -> codes (N, n)"),
                       ("decode", "codes (N, n) -> raw activations of one model (N, d)")):
        s = _sub(sub, name, what)
        s.add_argument("run")
        s.add_argument("--model", required=True)
        s.add_argument("--input" if name == "encode" else "--codes", required=True,
                       dest="input", help=".npy file")
        s.add_argument("--out", required=True, help=".npy file (float32)")
        s.add_argument("--device", default="cpu", help="cpu or cuda[:i]")


def _add_analysis(sub) -> None:
    from usae.options import EvalOptions, ExploreOptions, add_arguments

    s = _sub(sub, "eval", "cross-model R2, universality metrics and plots")
    s.add_argument("run")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True)
    add_arguments(s, EvalOptions)
    s.add_argument("--independent", default=None, help="run folder of independent SAEs to "
                   "match against (Hungarian on cosine)")
    s.add_argument("--compare", nargs="*", default=None, metavar="RUN",
                   help="other runs (the shuffled-pairing control, training variants) to "
                   "evaluate on the same split, reported beside this one")
    s.add_argument("--truth", default=None, metavar="DIR", help="a `usae synth` folder: score "
                   "the run against its known features (report.json's truth section)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")

    s = _sub(sub, "explore", "write a static concept explorer")
    s.add_argument("run")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eval", default=None, help="an eval folder to reuse (default: evaluate "
                   "the run into OUT/eval)")
    add_arguments(s, ExploreOptions)
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")

    s = _sub(sub, "cam", "coordinated activation maximization: one image per model and concept",
             epilog="On a 2-core CPU: --steps 64 --crops 1 (the demo's settings, "
             "about 8 s per model and concept); the defaults suit a GPU.")
    s.add_argument("run")
    s.add_argument("--store", required=True, help="the store the run was trained on")
    s.add_argument("--concept", default=None, help="K[,K...]: these concepts")
    s.add_argument("--top", type=int, default=None, help="the N most energetic universal "
                   "concepts (from --eval; without it, from one eval of the run on every "
                   "image, kept in OUT/ranking-eval and reused)")
    s.add_argument("--eval", default=None, help="an eval folder of this run (ranking and top "
                   "natural images)")
    s.add_argument("--out", default=None, help="output folder (default: RUN/cam)")
    from usae.options import CamOptions

    add_arguments(s, CamOptions)

    s = _sub(sub, "concepts", "print concepts of an eval in the terminal")
    s.add_argument("run", help="the run (used to check the eval belongs to it)")
    s.add_argument("--eval", required=True, help="an eval folder of this run")
    s.add_argument("--store", default=None, help="the store, to print top image paths")
    s.add_argument("--top", type=int, default=10, help="how many concepts, by energy")
    s.add_argument("--concept", default=None, help="K[,K...]: these concepts instead")
    s.add_argument("--universal", action="store_true", help="only universal concepts")
    s.add_argument("--images", type=int, default=3, help="top images per concept")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_synth(sub) -> None:
    from usae.analysis.synth import SynthOptions
    from usae.options import add_arguments

    s = _sub(sub, "synth", "write a store of synthetic models with known shared, partly shared "
             "and model-specific features, and the truth beside it",
             epilog="Then: usae train --store DIR/store --out RUN, and usae eval RUN --store "
             "DIR/store --out EVAL --truth DIR")
    s.add_argument("--out", required=True, help="folder for store/, truth.safetensors and "
                   "truth.json")
    add_arguments(s, SynthOptions)
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")


def _add_sharing(sub) -> None:
    s = _sub(sub, "push", "share a run on the Hugging Face Hub with a generated model card")
    s.add_argument("run")
    s.add_argument("repo_id", metavar="REPO_ID", help="OWNER/NAME on the Hub")
    s.add_argument("--eval", default=None, help="an eval folder of this run to share too")
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument("--dry-run", action="store_true", help="write RUN/README.md and list the "
                   "files, without any network")
    s.add_argument("--force", action="store_true", help="replace a RUN/README.md that usae "
                   "did not write")

    s = _sub(sub, "serve", "serve an explorer folder on 127.0.0.1")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usae", description="Universal Sparse Autoencoders: one "
                                "sparse concept space shared by several vision models.")
    p.add_argument("--version", action="version", version=f"usae {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_cache, _add_store, _add_train, _add_codec, _add_analysis,
                _add_sharing, _add_synth):
        add(sub)
    s = _sub(sub, "import-reference", "convert the paper's released checkpoints")
    s.add_argument("config", help="the reference YAML (model_zoo with checkpoint_path...)")
    s.add_argument("--out", required=True)
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
