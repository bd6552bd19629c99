"""CLI command handlers: each turns parsed arguments into one call of the Python API."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from usae.errors import UsaeError

log = logging.getLogger("usae")


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsaeError(f"{path} does not exist") from None
    except (OSError, ValueError) as err:
        raise UsaeError(f"{path} is not a readable .npy array: {err}") from None


def _save_npy(path: str, array: np.ndarray) -> None:
    from usae.io import atomic_write_with

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write_with(Path(path), write)


def cmd_encode(args: argparse.Namespace) -> int:
    import torch

    from usae.sae import UniversalSAE

    sae = UniversalSAE.load(args.run, device=args.device)
    x = _load_npy(args.input)
    sae.index(args.model)
    codes = sae.encode(args.model, torch.from_numpy(np.asarray(x, dtype=np.float32)))
    _save_npy(args.out, codes.numpy().astype(np.float32))
    print(f"wrote {args.out}: codes {tuple(codes.shape)} float32")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from usae.sae import UniversalSAE

    sae = UniversalSAE.load(args.run, device=args.device)
    sae.index(args.model)
    codes = _load_npy(args.input)
    x = sae.decode(args.model, torch.from_numpy(np.asarray(codes, dtype=np.float32)))
    _save_npy(args.out, x.numpy().astype(np.float32))
    print(f"wrote {args.out}: activations {tuple(x.shape)} float32")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from usae.reference import import_reference

    sae = import_reference(args.config, args.out)
    print(f"wrote {args.out}: models {list(sae.models)}, n={sae.cfg.n}, k={sae.cfg.k}")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    if args.store_command == "info":
        from usae.store import Store

        print(json.dumps(Store(args.store).info(), indent=2))
        return 0
    if args.store_command == "import-npz":
        from usae.npz_import import import_npz

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        manifest = import_npz(args.src, args.out, models, split=args.split, dtype=args.dtype)
        print(f"wrote {args.out}: {manifest['n_images']} images, models {models}")
        return 0
    raise UsaeError("usage: usae store {info,import-npz} ...")


def build_run_config(store_models, store_dims, args: argparse.Namespace):
    """Preset + --config + --set. With --resume the run's own config is the base, so only
    the keys given again are compared with it."""
    from dataclasses import asdict, replace

    from usae.config import load_config_file, parse_set, resolve

    overrides = {}
    preset, old = args.preset, None
    saved = Path(args.out) / "config.json"
    if getattr(args, "resume", False) and saved.exists():
        from usae.sae import load_run_config

        old = load_run_config(args.out)
        overrides.update({k: v for k, v in asdict(old.sae).items() if k not in ("models", "dims")})
        overrides.update(asdict(old.train))
        preset = "paper"  # the saved values already include their preset's; no second layer
    if args.config:
        overrides.update(load_config_file(args.config))
    overrides.update(parse_set(args.set))
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.device:
        overrides["device"] = args.device
    cfg = resolve(tuple(store_models), tuple(store_dims), preset, overrides)
    return replace(cfg, preset=old.preset) if old is not None else cfg


def cmd_train(args: argparse.Namespace) -> int:
    from usae.store import Store, StoreSource
    from usae.train import train_run

    store = Store(args.store)
    cfg = build_run_config(store.models, store.dims, args)
    source = StoreSource(store, split=args.split)
    val = None
    if cfg.train.eval_every:
        try:
            val = StoreSource(store, split="val")
        except UsaeError:
            log.warning("no val split in the store: the held-out R2 matrix is off")
    train_run(cfg, source, args.out, val_source=val, resume=args.resume,
              independent=args.independent, progress=not args.no_progress,
              store_manifest=store.manifest)
    print(f"wrote {args.out}: config.json, model.safetensors, metrics.jsonl")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from usae.cache import cache

    manifest = cache(args.models, args.images, args.out, dtype=args.dtype,
                     batch_size=args.batch_size, workers=args.workers, align=args.align,
                     keep_cls=args.keep_cls, device=args.device,
                     val_fraction=args.val_fraction, seed=args.seed)
    skipped = sum(1 for i in manifest["images"] if i.get("skipped"))
    print(f"wrote {args.out}: {manifest['n_images']} images ({skipped} skipped), models "
          f"{list(manifest['models'])}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from usae.demo import run_demo

    res = run_demo(args.out, n_images=args.images, steps=args.steps, models=args.models,
                   quick=args.quick)
    out = Path(args.out)
    t = res["timings"]
    print(f"\nusae demo finished in {t['total_s']:.0f}s (images {t['images_s']:.0f}s, cache "
          f"{t['cache_s']:.0f}s, train {t['train_s']:.0f}s)")
    print(f"  store:    {out / 'store'}   (usae store info {out / 'store'})")
    print(f"  run:      {out / 'run'}     (metrics.jsonl, model.safetensors)")
    if "report" in res:
        r2 = np.asarray(res["r2"])
        off = r2[~np.eye(len(r2), dtype=bool)].mean() if len(r2) > 1 else float("nan")
        print(f"  eval:     {res['report']}   held-out R2: self {np.diag(r2).mean():.2f}, "
              f"cross {off:.2f}")
    if "explorer" in res:
        print(f"  explorer: open {res['explorer']} in a browser, or: usae serve "
              f"{out / 'explorer'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from usae.evaluate import evaluate

    report = evaluate(args.run, args.store, args.out, split=args.split,
                      threshold=args.threshold, batch_images=args.batch_images,
                      device=args.device, plots=not args.no_plots,
                      independent=args.independent, compare=args.compare)
    s = report["summary"]
    cross = "n/a" if s["cross_r2_mean"] is None else f"{s['cross_r2_mean']:.3f}"
    print(f"wrote {args.out}: report.json, concepts.csv, plots — R2 self "
          f"{s['self_r2_mean']:.3f}, cross {cross}, "
          f"{report['concept_classes']['universal']} universal concepts")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from usae.explorer.build import build_explorer

    index = build_explorer(args.run, args.store, args.out, eval_dir=args.eval, top=args.top,
                           split=args.split)
    print(f"wrote {index}: open it in a browser, or run: usae serve {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from usae.explorer.serve import serve

    serve(args.dir, args.port)
    return 0
