#!/usr/bin/env bash
# Everything measured on the GPU machine, in one call. Results go to $OUT (or ./out).
#   bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
python3 -m strata.cli bench throughput --model random:llama-3.2-1b --kv-cache-memory 16 \
  --num-requests 16 --input-len 100-1024 --output-len 100-512 --concurrency 1 16 --compare-hf \
  --json "$OUT/throughput_llama32_1b.json" 2>&1 | tee "$OUT/throughput_llama32_1b.log"
