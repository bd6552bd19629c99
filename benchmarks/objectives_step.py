"""What each objective costs per training step (issues 23, 24): the `fast` preset's sparse
step with TopK against the energy rule, BatchTopK, Matryoshka and the global TopK across
models, on the same weights and batches, in interleaved rounds (each round times every rule
once, in turn), so that a slow spell of a shared machine hits every rule alike. Reports the
median per rule and its ratio to TopK. Prints one JSON object as its last line.

    python benchmarks/objectives_step.py [--tokens 2048] [--rounds 7] [--dims 768,384,768]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from usae.config import resolve
from usae.sae.model import UniversalSAE
from usae.sae.step import step_loss
from usae.sae.trainer import make_optimizer

RULES: dict[str, dict[str, object]] = {
    "topk": {"sparsity": "topk"},
    "energy": {"sparsity": "energy"},  # the fast preset's rule
    "batchtopk": {"sparsity": "batchtopk"},
    "matryoshka": {"sparsity": "topk", "matryoshka": "{m1},{m2}"},
    "batchtopk_matryoshka": {"sparsity": "batchtopk", "matryoshka": "{m1},{m2}"},
    "global": {"sparsity": "topk", "active_set": "global"},
    "global_cross": {"sparsity": "topk", "active_set": "global", "cross_coef": 1.0},
}


def one_step(sae: UniversalSAE, opts: dict, xs: dict, source: int, cfg) -> float:
    """Forward, backward and every model's AdamW step (decoder_update=all); seconds."""
    t0 = time.perf_counter()
    loss, _, _ = step_loss(sae, xs, source, cfg)
    loss.backward()
    for opt in opts.values():
        opt.step()
    sae.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dims", default="768,384,768")
    p.add_argument("--n", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    dims = tuple(int(d) for d in args.dims.split(","))
    models = tuple(f"m{i}" for i in range(len(dims)))
    torch.manual_seed(0)
    xs = {m: torch.randn(args.tokens, d) for m, d in zip(models, dims)}
    base = None
    setups = {}
    for name, keys in RULES.items():
        keys = {k: (v.format(m1=args.n // 8, m2=args.n // 2) if isinstance(v, str) else v)
                for k, v in keys.items()}
        cfg = resolve(models, dims, "fast", {"n_concepts": args.n, "k": args.k, **keys})
        sae = UniversalSAE(cfg.sae)
        if base is None:
            sae.init_encoders_from_dictionaries()
            base = sae.state_dict()
        sae.load_state_dict(base, strict=False)
        opts = {m: make_optimizer(sae.model_parameters(m), cfg.train) for m in models}
        setups[name] = (sae.train(), opts, cfg)
    times: dict[str, list[float]] = {name: [] for name in RULES}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (sae, opts, cfg) in setups.items():
            seconds = one_step(sae, opts, copy.copy(xs), r % len(models), cfg)
            if r:
                times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"threads": torch.get_num_threads(), "tokens": args.tokens, "dims": list(dims),
           "n": args.n, "k": args.k, "rounds": args.rounds,
           "tokens_per_s": {name: round(args.tokens / s) for name, s in med.items()},
           "ratio_to_topk": {name: round(med["topk"] / s, 3) for name, s in med.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
