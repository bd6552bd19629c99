#!/usr/bin/env bash
# Scale-out checks on a lent one-GPU machine: torchrun training with CUDA tensors through the
# global BatchNorm and the per-step all-reduce (two loopback "nodes" sharing the GPU; gloo,
# because NCCL refuses two ranks on one GPU) against one CUDA process; streaming training on
# CUDA; the ddp and stream benchmarks. Writes logs and JSON into ${OUT:-gpu-out}/.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 240 python3 - "$DEV" <<'PY' 2>&1 | tail -25 | tee "$OUT/ddp_cuda.txt"
import json, os, socket, subprocess, sys, tempfile, pathlib
import numpy as np
from tests.conftest import shared_latent_arrays
from usae.store.writer import store_from_arrays
dev = sys.argv[1]
root = pathlib.Path(tempfile.mkdtemp())
store_from_arrays(root / "store", shared_latent_arrays(n_images=256, tokens=16, dims=(96, 64, 80)),
                  dtype="float32", splits=["train"] * 256)
common = ["train", "--store", str(root / "store"), "--max-steps", "40", "--device", dev,
          "--no-progress", "--set", "n_concepts=512", "--set", "k=8", "--set", "batch_images=16",
          "--set", "log_every=1"]
env = {**os.environ, "USAE_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "4"}
def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env, **kw)
    print("$", " ".join(cmd[-12:]), "->", r.returncode, r.stdout[-300:], r.stderr[-600:])
for sets in ([], ["--set", "encoder=linear", "--set", "aux=gao", "--set", "dead_after_tokens=64"]):
    tag = "linear" if sets else "paper"
    run([sys.executable, "-m", "usae", *common, *sets, "--out", str(root / f"one-{tag}")])
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--node_rank", str(r), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
             "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", tag, "--local_addr", "127.0.0.1",
             "-m", "usae", *common, *sets, "--out", str(root / f"two-{tag}")], env=env,
             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=200); print("node ->", p.returncode, err[-400:] if p.returncode else "")
    from safetensors.torch import load_file
    a, b = load_file(root / f"one-{tag}" / "model.safetensors"), load_file(root / f"two-{tag}" / "model.safetensors")
    worst, key = max((float((a[k].double() - b[k].double()).abs().max() / (a[k].double().abs().max() or 1)), k)
                     for k in a if not k.endswith((".linear.bias", ".norm.running_mean")))
    print("worst tensor", key)
    la = [json.loads(x)["loss"] for x in (root / f"one-{tag}" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (root / f"two-{tag}" / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"preset": tag, "device": dev, "max_rel_weight_diff": worst,
                      "max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(la, lb))}))
PY
USAE_DIST_BACKEND=gloo timeout 150 python3 benchmarks/ddp.py --device "${DEV}:0" --nproc 2 --steps 10 --warmup 3 2>&1 | tail -4 | tee "$OUT/ddp_bench.json"
M="timm:resnet18?pretrained=0&name=rn,timm:vit_tiny_patch16_224?pretrained=0&name=vt"
[ -n "${SKIP_STREAM:-}" ] || timeout 200 python3 benchmarks/stream.py --device "$DEV" --models "$M" --images 96 --steps 10 --reps 1 --workers 4 2>&1 | tail -2 | tee "$OUT/stream_bench.json"
