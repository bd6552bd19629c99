"""The ``usae`` command: thin argument parsing over the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from usae.errors import UsaeError

def _config_keys_help() -> str:
    from usae.config import SAEConfig, TrainConfig, field_help

    lines = ["config keys for --set key=value (and --config FILE):"]
    for cls in (SAEConfig, TrainConfig):
        for name, default, text in field_help(cls):
            if name in ("models", "dims"):
                continue
            lines.append(f"  {name} (default {default!r}): {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from usae.config import PRESETS

    p = argparse.ArgumentParser(prog="usae", description="Universal Sparse Autoencoders: one "
                                "sparse concept space shared by several vision models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("demo", help="offline end-to-end demo on real pretrained CNNs and photos")
    s.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    s.add_argument("--images", type=int, default=320, help="number of training crops")
    s.add_argument("--steps", type=int, default=0, help="training steps (0: the demo default)")
    s.add_argument("--models", default="demo", help="model specs or the 'demo' preset")
    s.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")

    s = sub.add_parser("cache", help="extract activations of several models into a store",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="model specs: see README (presets: paper, demo)")
    s.add_argument("--models", required=True, help="SPEC[,SPEC...] or a preset: paper, demo")
    s.add_argument("--images", required=True, help="folder of images (class subfolders and "
                   "train/val levels allowed) or a text file listing image paths")
    s.add_argument("--out", required=True, help="store folder; re-running resumes")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   help="image-decoding processes (default: half the cores, 1 to 4)")
    s.add_argument("--align", default="resample", choices=["resample", "resize_input"],
                   help="resample feature grids to the smallest (paper), or resize inputs so "
                   "grids match")
    s.add_argument("--keep-cls", action="store_true", help="keep the CLS token as an extra row")
    s.add_argument("--device", default="cpu")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)

    st = sub.add_parser("store", help="inspect or import activation stores")
    ssub = st.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    s = ssub.add_parser("info", help="print the store's models, images and splits as JSON")
    s.add_argument("store")
    s = ssub.add_parser("import-npz", help="import the reference's per-image .npz cache")
    s.add_argument("src", help="folder tree of <image>_combined.npz or <image>_<NAME>.npz")
    s.add_argument("--out", required=True)
    s.add_argument("--models", required=True, help="NAME[,NAME...]")
    s.add_argument("--split", default=None, help="split the images go to (default: seeded "
                   "10%% val)")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    s = sub.add_parser("train", help="train a universal SAE on a store",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_keys_help())
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--config", help="JSON or YAML file of config keys")
    s.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: exactly the reference's rule (default)")
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--resume", action="store_true", help="continue from RUN's checkpoint")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    s.add_argument("--split", default="train", help="training split (default train)")
    s.add_argument("--device", default=None, help="cpu or cuda")
    s.add_argument("--independent", action="store_true",
                   help="train one ordinary TopK SAE per model instead (control)")
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("import-reference", help="convert the paper's released checkpoints")
    s.add_argument("config", help="the reference YAML (model_zoo with checkpoint_path...)")
    s.add_argument("--out", required=True)

    for name, what in (("encode", "raw activations (N, d) -> codes (N, n)"),
                       ("decode", "codes (N, n) -> raw activations of one model (N, d)")):
        s = sub.add_parser(name, help=what)
        s.add_argument("run")
        s.add_argument("--model", required=True)
        s.add_argument("--input" if name == "encode" else "--codes", required=True,
                       dest="input", help=".npy file")
        s.add_argument("--out", required=True, help=".npy file (float32)")
        s.add_argument("--device", default="cpu")

    s = sub.add_parser("eval", help="cross-model R2, universality metrics and plots")
    s.add_argument("run")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split", default="val", help="split to evaluate, or 'all' (default val)")
    s.add_argument("--threshold", type=float, default=0.1, help="firing threshold tau")
    s.add_argument("--batch-images", type=int, default=32)
    s.add_argument("--device", default="cpu")
    s.add_argument("--independent", default=None, help="run folder of independent SAEs to "
                   "match against (Hungarian on cosine)")
    s.add_argument("--compare", nargs="*", default=None, metavar="RUN",
                   help="other runs (the shuffled-pairing control, training variants) to "
                   "evaluate on the same split and summarize beside this one")
    s.add_argument("--no-plots", action="store_true")

    s = sub.add_parser("explore", help="write a static concept explorer")
    s.add_argument("run")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eval", default=None, help="an eval folder to reuse (default: run eval)")
    s.add_argument("--top", type=int, default=10, help="top images per concept")
    s.add_argument("--split", default="all")

    s = sub.add_parser("serve", help="serve an explorer folder on 127.0.0.1")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8000)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not args.command:
        parser.print_help()
        return 0
    from usae import commands

    handler = getattr(commands, "cmd_" + args.command.replace("-", "_"))
    try:
        return int(handler(args) or 0)
    except UsaeError as err:
        print(f"usae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"usae {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
