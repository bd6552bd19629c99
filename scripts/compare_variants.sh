#!/usr/bin/env bash
# Reproduces the tables in docs/RESULTS.md: training variants and controls on the demo store.
# Usage: scripts/compare_variants.sh [DEMO_DIR] [OUT] [PAPER_STEPS] [DEMO_STEPS]
# (after `make demo`). Runs of one family train for the same number of steps; paper-preset
# steps are 4x larger (32-image batches) and slower, so that family gets fewer.
set -euo pipefail
DEMO=${1:-demo-output}
OUT=${2:-variants}
PAPER_STEPS=${3:-300}
DEMO_STEPS=${4:-1500}
USAE=${USAE:-.venv/bin/usae}
STORE="$DEMO/store"
mkdir -p "$OUT"
train() {  # name, steps, then usae train options
  local name=$1 steps=$2; shift 2
  [ -f "$OUT/$name/model.safetensors" ] || [ -f "$OUT/$name/independent.json" ] || \
    "$USAE" train --store "$STORE" --out "$OUT/$name" --max-steps "$steps" --no-progress "$@"
}
train paper $PAPER_STEPS --preset paper
train paper_dec_all $PAPER_STEPS --preset paper --set decoder_update=all
train paper_global $PAPER_STEPS --preset paper --set schedule=global
train paper_per_dim $PAPER_STEPS --preset paper --set standardize=per_dim
train demo $DEMO_STEPS --preset demo
train demo_dec_all $DEMO_STEPS --preset demo --set decoder_update=all
train demo_global $DEMO_STEPS --preset demo --set schedule=global
train demo_per_dim $DEMO_STEPS --preset demo --set standardize=per_dim
train demo_scalar $DEMO_STEPS --preset demo --set standardize=scalar
train demo_shuffled $DEMO_STEPS --preset demo --set shuffle_pairing=true
train independent $DEMO_STEPS --preset demo --independent
"$USAE" eval "$OUT/demo" --store "$STORE" --out "$OUT/demo/eval" \
  --independent "$OUT/independent" \
  --compare "$OUT/paper" "$OUT/paper_dec_all" "$OUT/paper_global" "$OUT/paper_per_dim" \
            "$OUT/demo_dec_all" "$OUT/demo_global" "$OUT/demo_per_dim" "$OUT/demo_scalar" \
            "$OUT/demo_shuffled"
python3 - "$OUT/demo/eval/report.json" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
print("| run | cross R² (mean off-diagonal) | self R² | dead fraction | FE median |")
print("|---|---|---|---|---|")
for row in rep["comparison"]:
    fe = row["firing_entropy_median"]
    print(f"| {row['run'].split('/')[-1]} | {row['cross_r2_mean']:.3f} | {row['self_r2_mean']:.3f} "
          f"| {row['dead_fraction_mean']:.3f} | {'—' if fe is None else f'{fe:.3f}'} |")
print()
print("| model | matched (cos > 0.5) | mean cosine | random: matched | random: mean cosine |")
print("|---|---|---|---|---|")
for m, r in rep["independent"]["models"].items():
    print(f"| {m} | {r['matched_fraction']:.3f} | {r['mean_cosine']:.3f} "
          f"| {r['random_matched_fraction']:.3f} | {r['random_mean_cosine']:.3f} |")
PY
