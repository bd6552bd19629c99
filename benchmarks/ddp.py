"""Data-parallel training speed: 1 process against N processes under torchrun, at the paper's
dims (32 images x 196 tokens, d = 768/384/768, n = 6144, k = 32, the paper preset).

Each configuration runs as its own ``torchrun`` job (gloo on CPU, NCCL on CUDA); the workers
time every step and every collective (the BatchNorm sums and the one all-reduce per step), and
count the bytes they reduce. With N processes on a machine of C cores each process gets C/N
threads, so the comparison spends the same cores. On this 2-core CPU expect no speed-up: the
figure that matters is ``comm_fraction`` (time inside collectives over step time, an upper
bound that includes waiting for the slower rank). Prints one JSON object as its last line.

    python benchmarks/ddp.py [--nproc 2] [--steps 6] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

MODELS = ("siglip", "dinov2", "vit")
DIMS = (768, 384, 768)


def worker(args: argparse.Namespace) -> None:
    import torch

    import usae.distributed as distributed
    from usae.config import resolve
    from usae.data.sources import ArraySource
    from usae.sae.trainer import Trainer

    counters = {"seconds": 0.0, "bytes": 0}
    real = distributed._checked

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        real(fn, *a, **kw)
        counters["seconds"] += time.perf_counter() - t0
        counters["bytes"] += sum(t.numel() * t.element_size() for t in a
                                 if isinstance(t, torch.Tensor))

    distributed._checked = timed
    dist = distributed.Dist.from_env(args.device)
    gen = torch.Generator().manual_seed(0)
    arrays = {m: torch.randn(2 * args.images, args.tokens, d, generator=gen)
              for m, d in zip(MODELS, DIMS)}
    cfg = resolve(MODELS, DIMS, "paper", {"n_concepts": args.concepts, "k": 32,
                                          "batch_images": args.images, "device": args.device})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False, dist=dist)
        source = ArraySource(arrays)
        trainer._set_standardization(source)
        stream = trainer._stream(source, 2)
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                counters.update(seconds=0.0, bytes=0)
            batch = next(stream)
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step(batch, 10, 1000)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s = sum(times[args.warmup:]) / args.steps
        params = sum(p.numel() * p.element_size() for p in trainer.sae.parameters())
    if dist.is_main:
        print("RESULT " + json.dumps({
            "world": dist.world, "step_s": step_s,
            "tokens_per_s": args.images * args.tokens / step_s,
            "comm_s_per_step": counters["seconds"] / args.steps,
            "allreduce_bytes_per_step": counters["bytes"] / args.steps,
            "param_bytes": params}), flush=True)
    dist.close()


def launch(nproc: int, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--images",
           str(args.images), "--tokens", str(args.tokens), "--concepts", str(args.concepts),
                                                                             "--device",
           args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"torchrun failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--concepts", type=int, default=6144)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    one, many = launch(1, args), launch(args.nproc, args)
    device = "cpu"
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    print(json.dumps({
        "device": device, "cores": len(os.sched_getaffinity(0)), "nproc": args.nproc,
        "tokens_per_s_1": round(one["tokens_per_s"]),
        f"tokens_per_s_{args.nproc}": round(many["tokens_per_s"]),
        "speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 3),
        "comm_fraction": round(many["comm_s_per_step"] / many["step_s"], 3),
        "allreduce_bytes_per_step": round(many["allreduce_bytes_per_step"]),
        "param_bytes": many["param_bytes"],
        "allreduce_over_params": round(many["allreduce_bytes_per_step"] /
                                       many["param_bytes"], 3)}))


if __name__ == "__main__":
    main()
