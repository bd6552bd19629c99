#!/usr/bin/env bash
# The CUDA checks, as one short run on a lent GPU machine (its image has torch, timm, pytest,
# hypothesis, safetensors): CUDA tests, a CUDA train/resume/eval round trip through the CLI,
# caching through a random-weight timm ViT with bf16 autocast, and train_step on the GPU.
# Writes logs and JSON into ${OUT:-gpu-out}/.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/sae/test_train.py tests/sae/test_step.py tests/sae/test_sparse.py \
  tests/sae/test_fused.py tests/sae/test_sae.py tests/analysis/test_metrics.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 120 python3 - <<'PY' > "$OUT/cli.txt" 2>&1
import json, subprocess, sys, tempfile, pathlib
import numpy as np
from PIL import Image
from usae.store.writer import store_from_arrays
root = pathlib.Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
store_from_arrays(root / "store", {"a": rng.normal(size=(64, 16, 48)).astype("f4"),
                                   "b": rng.normal(size=(64, 16, 32)).astype("f4")})
def usae(*a):
    r = subprocess.run([sys.executable, "-m", "usae", *a], capture_output=True, text=True)
    print("$ usae", *a, "->", r.returncode); print(r.stdout[-400:], r.stderr[-300:])
    return r.returncode
usae("train", "--store", str(root/"store"), "--out", str(root/"run"), "--device", "cuda",
     "--max-steps", "30", "--set", "checkpoint_every=10", "--set", "n_concepts=256", "--no-progress")
usae("train", "--store", str(root/"store"), "--out", str(root/"run"), "--resume", "--no-progress")
usae("eval", str(root/"run"), "--store", str(root/"store"), "--out", str(root/"eval"), "--device", "cuda", "--no-plots")
imgs = root / "imgs"; imgs.mkdir()
for i in range(12):
    Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
usae("cache", "--models", "timm:vit_tiny_patch16_224?pretrained=0&name=vt,timm:resnet18?pretrained=0&name=rn",
     "--images", str(imgs), "--out", str(root/"cstore"), "--device", "cuda", "--workers", "2")
usae("store", "info", str(root/"cstore"))
PY
grep -- "->" "$OUT/cli.txt"
timeout 150 python3 benchmarks/train_step.py --device cuda --reps 5 2>&1 | tail -3 | tee "$OUT/train_step_cuda.json"
