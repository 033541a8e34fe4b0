#!/usr/bin/env bash
# Speed of two commits side by side on the GPU, in one call: the decode and offline
# sections of gpu_speed.py (this checkout's script) against the tree in .before/ (made
# here with `git archive REV | tar -x -C .before`) and against this checkout.
#   bash benchmarks/gpu_before_after.sh [SECTIONS]     (default decode,offline)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
sections="${1:-decode,offline}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for tree in before after; do
  root="$PWD"; [ "$tree" = before ] && root="$PWD/.before"
  echo "== $tree ($(cat "$root/.rev" 2>/dev/null || git rev-parse --short HEAD))"
  PYTHONPATH="$root" python3 benchmarks/gpu_speed.py --only "$sections" --hf-subset 0 \
    --json "$OUT/speed_$tree.json" 2>&1 | grep -v "^\s*$" | tee "$OUT/speed_$tree.log" \
    | grep -E "tok/s|==|roofline|Error|error" 
done
