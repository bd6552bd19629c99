"""Where one TopK SAE step spends its time, op by op, next to eai-sparsify's (the steps of
``benchmarks/peers.py``), plus the two ways of computing a sparse weight gradient side by side.

``python benchmarks/profile_step.py --device cuda`` prints, for each step, the ops that take
most of the device's (or the CPU's) time under ``torch.profiler``, and as its last line one JSON
object: ``sparse_rows_grad_s`` (our sorted ``embedding_bag``, ``ConceptOrder``) against
``dense_grad_s`` (the sparse gradient scattered into an (N, n) matrix, then one GEMM) for the
encoder's and the dictionary's weight-gradient shapes. sparsify runs its eager decoder, as in
``peers.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import torch  # noqa: E402

from usae.sae.sparse import ConceptOrder  # noqa: E402


def _time(fn, device: torch.device, reps: int = 20) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_grad_shapes(n: int, device: torch.device) -> dict[str, float]:
    """Seconds for ``G^T @ x`` with G (N, n) holding k entries per row: sparse and dense."""
    tokens, d, k = peers.TOKENS, peers.D, peers.K
    x = torch.randn(tokens, d, device=device)
    cols = torch.stack([torch.randperm(n, device=device)[:k] for _ in range(tokens)])
    grads = torch.randn(tokens, k, device=device)

    def sparse() -> torch.Tensor:  # the sort included, as in a step
        return ConceptOrder(grads, cols, n).weight_grad(x)

    def dense() -> torch.Tensor:
        g = x.new_zeros(tokens, n).scatter_(1, cols, grads)
        return g.T @ x

    assert torch.allclose(sparse(), dense(), atol=1e-3, rtol=1e-3)
    return {f"sparse_rows_grad_s_{n}": round(_time(sparse, device), 6),
            f"dense_grad_s_{n}": round(_time(dense, device), 6)}


def profile(name: str, step, device: torch.device, rows: int) -> None:
    """Print the ``rows`` ops of ``step`` with the most self time on ``device``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    for _ in range(3):
        step()
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"== {name} (5 steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=6144)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--usae", action="store_true",
                    help="also the USAE step at paper dims, `paper` and `fast` presets")
    args = ap.parse_args()
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # peers.py's default
    device = peers.DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(peers.TOKENS, peers.D, device=device)
    dead = torch.rand(args.n, device=device) < 0.25
    steps = {"ours_none": peers.ours(args.n, "none", x, dead),
             "ours_gao": peers.ours(args.n, "gao", x, dead)}
    try:
        steps["sparsify"] = peers.sparsify(args.n, False, x, dead)
        steps["sparsify_auxk"] = peers.sparsify(args.n, True, x, dead)
    except ImportError as err:
        print(f"sparsify skipped: {err}")
    if args.usae:
        steps["usae_paper"] = peers.usae_step("paper", args.n)
        steps["usae_fast"] = peers.usae_step("fast", args.n)
    for name, step in steps.items():
        profile(name, step, device, args.rows)
    result = {"device": str(device), "n": args.n}
    for n in (6144, 24576):
        result.update(weight_grad_shapes(n, device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
