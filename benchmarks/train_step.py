"""Training-step speed at the paper's dims: our step against the reference's dense maths.

The dense formulation below is written as the reference computes it: dense codes @ D for the
main and the auxiliary decode of every model, a full top-n/2 sort per decoded model, and
gradients for every decoder (then only the source model steps). Both run in this process,
alternating, on identical weights and batches. Prints one JSON object as its last line.

    python benchmarks/train_step.py [--reps 3] [--tokens 6272]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from usae.config import resolve, with_train
from usae.sae.model import UniversalSAE
from usae.sae.oracles import naive_step_loss
from usae.sae.step import step_loss

MODELS = ("siglip", "dinov2", "vit")
DIMS = (768, 384, 768)


def full_step(sae, opt, loss_fn, src_model: str, clip: float) -> float:
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in sae.model_parameters(src_model)
                                    if p.grad is not None], clip)
    opt.step()
    sae.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sgemm_peak(size: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def ours_flops(n_tok: int, n: int, dims: tuple[int, ...], src: int) -> float:
    d_all, d_i = sum(dims), dims[src]
    enc = 2 * 2 * n_tok * d_i * n  # forward + weight gradient
    aux = 2 * 2 * n_tok * n * d_all + 2 * n_tok * n * d_i  # forward, grad wrt codes, grad D_i
    return float(enc + aux)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32 * 196)
    ap.add_argument("--n", type=int, default=6144)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on both)")
    ap.add_argument("--glibc-default-malloc", action="store_true",
                    help="do not apply the trainer's keep_freed_memory setting")
    args = ap.parse_args()
    if not args.glibc_default_malloc:
        from usae.malloc import keep_freed_memory

        # What the trainer does on CPU. Process-wide, so the dense formulation gets it too:
        # the ratio compares the maths, like for like.
        keep_freed_memory()
    torch.manual_seed(0)
    cfg = resolve(MODELS, DIMS, "paper", {"n_concepts": args.n, "k": 32})
    base = UniversalSAE(cfg.sae).to(args.device)
    xs = {m: torch.randn(args.tokens, d).to(args.device) for m, d in zip(MODELS, DIMS)}

    # Agreement: identical weights, identical batch, forward loss and the stepped gradients.
    ours_sae, dense_sae = copy.deepcopy(base), copy.deepcopy(base)
    l_ours, _, _ = step_loss(ours_sae, xs, 0, cfg)
    l_ours.backward()
    l_dense = naive_step_loss(dense_sae, xs, 0, "l1")
    l_dense.backward()
    loss_rel = abs(float(l_ours.detach()) - float(l_dense.detach())) / abs(float(l_dense.detach()))
    # One relative norm over all stepped gradients (the bias before BatchNorm has a zero true
    # gradient, so a per-tensor ratio there would compare rounding noise with itself).
    g_o = torch.cat([p.grad.flatten() for p in ours_sae.model_parameters(MODELS[0])])
    g_d = torch.cat([p.grad.flatten() for p in dense_sae.model_parameters(MODELS[0])])
    grad_rel = float((g_o - g_d).norm() / g_d.norm())

    def timed(fn) -> float:
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        return time.perf_counter() - t0

    ours_t, dense_t, ours_fl = [], [], []
    saes = {"ours": copy.deepcopy(base), "dense": copy.deepcopy(base)}
    opts = {k: {m: torch.optim.AdamW(s.model_parameters(m), lr=3e-4, weight_decay=1e-5)
                for m in MODELS} for k, s in saes.items()}
    for rep in range(args.reps + 1):  # rep 0 warms up both
        src = rep % len(MODELS)
        m = MODELS[src]
        t_o = timed(lambda: full_step(saes["ours"], opts["ours"][m],
                                      lambda: step_loss(saes["ours"], xs, src, cfg)[0], m, 1.0))
        t_d = timed(lambda: full_step(saes["dense"], opts["dense"][m],
                                      lambda: naive_step_loss(saes["dense"], xs, src, "l1"),
                                      m, 1.0))
        if rep:
            ours_t.append(t_o)
            dense_t.append(t_d)
            ours_fl.append(ours_flops(args.tokens, cfg.sae.n, DIMS, src))

    # Tokens/s of the named improvements (same maths engine, other options).
    variants = {}
    for name, changes in {"decoder_update=all": {"decoder_update": "all"},
                          "aux=gao": {"aux": "gao", "dead_after_tokens": 0},
                          "aux=none": {"aux": "none"}}.items():
        vcfg = with_train(cfg, **changes)
        sae = copy.deepcopy(base)
        opt = {m: torch.optim.AdamW(sae.model_parameters(m), lr=3e-4) for m in MODELS}
        dead = (torch.ones(cfg.sae.n, dtype=torch.bool, device=args.device)
                if changes.get("aux") == "gao" else None)
        times = []
        for rep in range(2):
            src = rep % len(MODELS)
            times.append(timed(lambda: full_step(
                sae, opt[MODELS[src]], lambda: step_loss(sae, xs, src, vcfg, dead)[0],
                MODELS[src], 1.0)))
        variants[name] = round(args.tokens / min(times), 1)
    # The `fast` preset: its own SAE (linear encoders), every decoder stepped, AuxK with the
    # dead concepts of a healthy run (none: its held-out dead fraction is 0.04 on the demo).
    fcfg = resolve(MODELS, DIMS, "fast", {"n_concepts": args.n, "k": 32})
    fsae = UniversalSAE(fcfg.sae).to(args.device)
    fopt = {m: torch.optim.AdamW(fsae.model_parameters(m), lr=3e-4) for m in MODELS}
    no_dead = torch.zeros(fcfg.sae.n, dtype=torch.bool, device=args.device)
    times = []
    for rep in range(3):
        src = rep % len(MODELS)

        def fast_step() -> float:
            loss = step_loss(fsae, xs, src, fcfg, no_dead)[0]
            loss.backward()
            for m in MODELS:  # decoder_update=all: every model steps, clipped as in training
                torch.nn.utils.clip_grad_norm_([p for p in fsae.model_parameters(m)
                                                if p.grad is not None], 1.0)
                fopt[m].step()
            fsae.zero_grad(set_to_none=True)
            return float(loss.detach())

        times.append(timed(fast_step))
    variants["preset=fast"] = round(args.tokens / min(times[1:]), 1)

    peak = sgemm_peak(device=args.device)
    ours_s = sum(ours_t) / len(ours_t)
    dense_s = sum(dense_t) / len(dense_t)
    result = {
        "benchmark": "train_step", "tokens": args.tokens, "n_concepts": cfg.sae.n, "k": 32,
        "dims": list(DIMS), "threads": torch.get_num_threads(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "ours_s": round(ours_s, 3), "dense_s": round(dense_s, 3),
        "speedup": round(dense_s / ours_s, 3),
        "loss_rel_diff": loss_rel, "grad_rel_diff": grad_rel,
        "ours_gflops": round(sum(ours_fl) / sum(ours_t) / 1e9, 1),
        "peak_gflops": round(peak, 1),
        "ours_tokens_per_s": round(args.tokens / ours_s, 1),
        "dense_tokens_per_s": round(args.tokens / dense_s, 1),
        "variant_tokens_per_s": variants,
        "fast_tokens_per_s": variants["preset=fast"],
        "fast_over_paper": round(variants["preset=fast"] * ours_s / args.tokens, 3),
        "keep_freed_memory": not args.glibc_default_malloc,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
