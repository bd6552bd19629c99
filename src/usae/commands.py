"""CLI command handlers: each turns parsed arguments into one call of the Python API and
prints what was written (only after it was written)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from usae.errors import UsaeError
from usae.files import atomic_write_with, json_text

log = logging.getLogger("usae")


def _load_npy(path: str) -> np.ndarray:
    """A numeric .npy array (nothing is unpickled)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except FileNotFoundError:
        raise UsaeError(f"{path} does not exist") from None
    except OSError as err:
        raise UsaeError(f"cannot read {path}: {err.strerror}") from None
    if magic != b"\x93NUMPY":
        raise UsaeError(f"{path} is not a .npy file (no NumPy header) — save arrays with "
                        "numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsaeError(f"{path} does not exist") from None
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise UsaeError(f"{path} holds Python objects (a pickled array); usae reads only "
                            "numeric .npy files — save it with a float dtype") from None
        raise UsaeError(f"{path} is not a .npy array ({err}) — save it with numpy.save"
                        ) from None
    except OSError as err:
        raise UsaeError(f"{path} is not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        raise UsaeError(f"{path} has dtype {getattr(array, 'dtype', type(array))}; expected a "
                        "numeric (float or integer) array")
    return array


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write_with(Path(path), write)


def _codec(args: argparse.Namespace, encode: bool) -> tuple[tuple[int, ...], str]:
    import torch

    from usae.options import check_device
    from usae.sae.model import UniversalSAE

    check_device(args.device)
    sae = UniversalSAE.load(args.run, device=args.device)
    sae.index(args.model)
    x = torch.from_numpy(np.asarray(_load_npy(args.input), dtype=np.float32))
    out = sae.encode(args.model, x) if encode else sae.decode(args.model, x)
    _save_npy(args.out, out.numpy().astype(np.float32))
    return tuple(out.shape), "codes" if encode else "activations"


def cmd_encode(args: argparse.Namespace) -> int:
    shape, what = _codec(args, encode=True)
    print(f"wrote {args.out}: {what} {shape} float32")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    shape, what = _codec(args, encode=False)
    print(f"wrote {args.out}: {what} {shape} float32")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from usae.sae.reference import import_reference

    sae = import_reference(args.config, args.out)
    print(f"wrote {args.out}: models {list(sae.models)}, n={sae.cfg.n}, k={sae.cfg.k}")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    if args.store_command == "info":
        from usae.store.store import Store

        print(json.dumps(Store(args.store).info(), indent=2), flush=True)
        return 0
    if args.store_command == "merge":
        from usae.store.merge import merge_shards

        manifest = merge_shards(args.shards, args.out, force=args.force)
        print(f"wrote {args.out}: {manifest['n_images']} images from {len(args.shards)} shards, "
              f"content hash {manifest['content_hash'][:16]}")
        return 0
    if args.store_command == "import-npz":
        from usae.store.npz_import import import_npz

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        manifest = import_npz(args.src, args.out, models, split=args.split, dtype=args.dtype)
        print(f"wrote {args.out}: {manifest['n_images']} images, models {models}")
        return 0
    if args.store_command == "add-model":
        from usae.data.store_add import add_models
        from usae.distributed import is_main_process
        from usae.options import STORE_KEEPS, CacheOptions

        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CacheOptions)
                 if f.name not in STORE_KEEPS}
        manifest = add_models(args.store, args.models, CacheOptions(**given),
                              progress=not args.no_progress)
        if not is_main_process():  # (under torchrun: one line, as `usae cache` prints)
            return 0
        print(f"{args.store}: models {list(manifest['models'])}, {manifest['n_images']} images, "
              f"content hash {manifest['content_hash'][:16]}")
        return 0
    raise UsaeError("a store command is needed — usage: usae store "
                    "{info,merge,import-npz,add-model} ...")


def cmd_train(args: argparse.Namespace) -> int:
    from usae.config import SAEConfig, TrainConfig
    from usae.distributed import is_main_process
    from usae.options import StreamOptions, given_args

    keys = {**given_args(SAEConfig, args), **given_args(TrainConfig, args)}
    common = {"preset": args.preset, "config_file": args.config, "sets": args.set, "keys": keys,
              "max_steps": args.max_steps, "device": args.device, "resume": args.resume,
              "force": args.force, "split": args.split, "progress": not args.no_progress}
    if bool(args.store) == bool(args.images):
        raise UsaeError("give either --store (a cached store) or --images with --models "
                        "(activations computed on the fly)")
    image_options = given_args(StreamOptions, args)
    if image_options and not args.images:
        flags = ", ".join("--" + k.replace("_", "-") for k in image_options)
        raise UsaeError(f"{flags}: image options apply with --images; a store was cached "
                        "with its own")
    if args.extend:
        from usae.sae.extend import extend_run

        if not args.store or args.independent:
            raise UsaeError("--extend needs --store (a store with the run's models and the new "
                            "ones) and trains one universal SAE (no --independent)")
        summary = extend_run(args.extend, args.store, args.out, finetune=args.finetune,
                             **common)
    elif args.finetune:
        raise UsaeError("--finetune goes with --extend RUN (the run whose weights to train)")
    elif args.store:
        from usae.sae.training import train_from_store

        summary = train_from_store(args.store, args.out, independent=args.independent,
                                   **common)
    else:
        from usae.data.streaming import train_from_images

        if not args.models:
            raise UsaeError("--images needs --models SPEC[,SPEC...]")
        if args.independent:
            raise UsaeError("--independent needs a store: usae cache, then train --store")
        summary = train_from_images(args.images, args.models, args.out,
                                    StreamOptions(**image_options), **common)
    if is_main_process():
        print(_train_summary(summary))
    return 0


def _train_summary(s: dict) -> str:
    if "independent" in s:
        return f"wrote {s['run']}: one independent SAE per model ({', '.join(s['independent'])})"
    lines = [f"wrote {s['run']}: config.json, model.safetensors, metrics.jsonl, checkpoint",
             f"  {s['steps']} steps, {s['tokens']:,} tokens in {s['elapsed_s']:.1f}s "
             f"({s['tokens_per_s']:,} tokens/s)"]
    if s.get("loss") is not None:
        recon = ", ".join(f"{m} {v:.4f}" for m, v in (s.get("recon") or {}).items())
        lines.append(f"  last logged loss {s['loss']:.4f} (reconstruction: {recon})")
    for m, d in (s.get("concept_drift") or {}).items():
        lines.append(f"  {m}: concepts moved by fine-tuning: mean cosine to before "
                     f"{d['mean_cosine']:.3f}, {d['moved_fraction']:.1%} below 0.9")
    if s.get("val_r2"):
        r2 = np.asarray(s["val_r2"])
        off = r2[~np.eye(len(r2), dtype=bool)]
        lines.append(f"  held-out R2: self {np.diag(r2).mean():.3f}"
                     + (f", cross {off.mean():.3f}" if off.size else ""))
    return "\n".join(lines)


def cmd_cache(args: argparse.Namespace) -> int:
    from usae.data.cache import cache
    from usae.distributed import is_main_process
    from usae.options import CacheOptions, from_args

    options = from_args(CacheOptions, args)
    manifest = cache(args.models, args.images, args.out, options)
    if not is_main_process():
        return 0
    if options.shard_dir:
        print(f"wrote shard {manifest['shard']['index']} of {manifest['shard']['count']} in "
              f"{options.shard_dir}; once every rank is done, join the shards with: "
              f"usae store merge {options.shard_dir}/shard-* --out {args.out}")
        return 0
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
    if res.get("faithfulness"):
        from usae.analysis.faithfulness import format_table

        print(format_table(res["faithfulness"]))
    if res.get("cam"):
        first = next(iter(res["cam"].values()))
        scores = ", ".join(f"{v:.1f}" for v in first["self_ratio"].values())
        print(f"  cam:      {out / 'run' / 'cam'}   concepts {list(res['cam'])} in "
              f"{res['cam_s']:.0f}s; concept {first['concept']}: self score {scores}, transfer "
              f"{_fmt(first['transfer_offdiag_mean'])} vs frequency-matched control "
              f"{_fmt(first['transfer_control_offdiag_mean'])} (robust scores: 1 = the natural "
              "top 1 %)")
    if "explorer" in res:
        print(f"  explorer: open {res['explorer']} in a browser, or: usae serve "
              f"{out / 'explorer'}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def cmd_eval(args: argparse.Namespace) -> int:
    from usae.analysis.evaluate import evaluate
    from usae.options import EvalOptions, from_args

    opts = from_args(EvalOptions, args)
    report = evaluate(args.run, args.store, args.out, opts, independent=args.independent,
                      compare=args.compare, force=args.force, truth=args.truth)
    s = report.summary
    cross = "n/a" if s["cross_r2_mean"] is None else f"{s['cross_r2_mean']:.3f}"
    written = "report.json, concepts.csv" + (", plots" if opts.plots else "")
    print(f"wrote {args.out}: {written} — R2 self {s['self_r2_mean']:.3f}, cross {cross}, "
          f"{report.concept_classes['universal']} universal concepts, Jaccard of active "
          f"sets across models {_fmt(s.get('jaccard_cross_mean'))}")
    if report.faithfulness is not None:
        from usae.analysis.eval_folder import REPORT_FILE, read_report
        from usae.analysis.faithfulness import format_table

        print(format_table(report.faithfulness))
        for folder in sorted(Path(args.out, "compare").glob(f"*/{REPORT_FILE}")):
            other = read_report(folder.parent).faithfulness
            if other is not None:
                print(f"  compared run {folder.parent.name}:")
                print(format_table(other))
    if report.truth is not None:
        print(_truth_summary(report.truth))
    return 0


def _truth_summary(t: dict) -> str:
    rec = ", ".join(f"{m} {v:.3f}" for m, v in t["recovery"].items())
    return (f"  against the truth: recovery (mean best cosine) {rec}; shared as one concept "
            f"{_fmt(t['shared_as_one'])}, partly shared {_fmt(t['partial_as_one'])}; "
            f"model-specific detected {_fmt(t['specific_detected'])}; MCC {t['mcc_mean']:.3f}; "
            f"spurious {t['spurious']['count']} of {t['spurious']['firing']} firing concepts")


def cmd_synth(args: argparse.Namespace) -> int:
    from usae.analysis.synth import SynthOptions, synth
    from usae.options import from_args

    s = synth(args.out, from_args(SynthOptions, args), force=args.force)
    print(f"wrote {args.out}: store/ ({s['images']} images x {s['tokens']} tokens, models "
          f"{', '.join(f'{m} (d={d})' for m, d in zip(s['models'], s['dims']))}), truth with "
          f"{s['n_features']} features ({', '.join(f'{k} {v}' for k, v in s['features'].items())})"
          f"\n  next: usae train --store {args.out}/store --out RUN --preset fast, then usae eval "
          f"RUN --store {args.out}/store --out EVAL --truth {args.out}")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from usae.explorer.build import build_explorer
    from usae.options import ExploreOptions, from_args

    index = build_explorer(args.run, args.store, args.out, eval_dir=args.eval,
                           options=from_args(ExploreOptions, args), force=args.force)
    print(f"wrote {index}: open it in a browser, or run: usae serve {args.out}")
    return 0


def _concept_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UsaeError(f"--concept takes integers K[,K...], got {text!r}") from None


def cmd_cam(args: argparse.Namespace) -> int:
    from usae.cam.maximize import run_cam
    from usae.options import CamOptions, from_args

    if (args.concept is None) == (args.top is None):
        raise UsaeError("give either --concept K[,K...] or --top N")
    results = run_cam(args.run, args.store, _concept_ids(args.concept), args.top, args.out,
                      from_args(CamOptions, args), eval_dir=args.eval)
    out = args.out or f"{args.run}/cam"
    for k, doc in results.items():
        scores = ", ".join(f"{m} {v:.2f}" for m, v in doc["self_ratio"].items())
        print(f"wrote {out}/{k}/: self score {scores}; transfer off-diagonal "
              f"{_fmt(doc['transfer_offdiag_mean'])} (frequency-matched control concept "
              f"{doc['control_concept']}: {_fmt(doc['transfer_control_offdiag_mean'])}); "
              "robust scores: 0 = a typical natural image, 1 = the natural top 1 %")
    return 0


def cmd_concepts(args: argparse.Namespace) -> int:
    from usae.analysis.concepts import concept_table, format_table
    from usae.analysis.eval_folder import check_eval_of_run
    from usae.hub import local_run
    from usae.sae.run import read_config

    run = local_run(args.run)
    cfg = read_config(run)
    models = list(cfg.sae.models)
    ks = _concept_ids(args.concept)
    if args.top < 1 or args.images < 0:
        raise UsaeError("--top must be at least 1 and --images at least 0")
    check_eval_of_run(args.eval, run, models, cfg.sae.n)
    table = concept_table(args.eval, ks, args.top, args.universal, args.store, args.images,
                          models=models)
    print(json_text(table, indent=2) if args.json else format_table(table), flush=True)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from usae.hub import describe_plan, push

    plan = push(args.run, args.repo_id, args.eval, private=args.private, dry_run=args.dry_run,
                force=args.force)
    print(describe_plan(plan))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from usae.explorer.serve import serve

    serve(args.dir, args.port)
    return 0
