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
train demo $DEMO_STEPS --preset demo --set decoder_update=source
train demo_dec_all $DEMO_STEPS --preset demo --set decoder_update=all
train demo_global $DEMO_STEPS --preset demo --set decoder_update=source --set schedule=global
train demo_per_dim $DEMO_STEPS --preset demo --set decoder_update=source --set standardize=per_dim
train demo_scalar $DEMO_STEPS --preset demo --set decoder_update=source --set standardize=scalar
train demo_shuffled $DEMO_STEPS --preset demo --set decoder_update=source --set shuffle_pairing=true
train independent $DEMO_STEPS --preset demo --set decoder_update=source --independent
"$USAE" eval "$OUT/demo" --store "$STORE" --out "$OUT/demo/eval" \
  --independent "$OUT/independent" \
  --compare "$OUT/paper" "$OUT/paper_dec_all" "$OUT/paper_global" "$OUT/paper_per_dim" \
            "$OUT/demo_dec_all" "$OUT/demo_global" "$OUT/demo_per_dim" "$OUT/demo_scalar" \
            "$OUT/demo_shuffled"
python3 "$(dirname "$0")/results_tables.py" "$OUT/demo/eval/report.json"
