#!/usr/bin/env bash
# Everything measured on the GPU machine. Results go to $OUT (or ./out).
#   bash benchmarks/gpu_run.sh [all|check|speed|offline|serve]...   (default: all)
# Each stage fits one 10-minute device call on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stages="${*:-all}"
has() { [[ " $stages " == *" $1 "* || " $stages " == *" all "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if has check; then
  python3 benchmarks/gpu_check.py --only models 2>&1 | tee "$OUT/gpu_check.log"
fi
if has speed; then
  python3 benchmarks/gpu_speed.py --only decode,prefill,fusion,syncs,profile \
    --json "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.log"
fi
if has offline; then
  python3 benchmarks/gpu_speed.py --only offline --json "$OUT/gpu_offline.json" 2>&1 \
    | tee "$OUT/gpu_offline.log"
fi
if has serve; then
  python3 -m strata.cli serve --model random:llama-3.2-1b --port 8011 --max-model-len 4096 \
    > "$OUT/serve_server.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:8011/v1/models > /dev/null && break; sleep 1; done
  python3 -m strata.cli bench serve --url http://127.0.0.1:8011 --num-requests 200 \
    --request-rate 4 16 64 inf --input-len 100-1024 --output-len 100-1024 --seed 0 \
    --json "$OUT/serve.json" --plot "$OUT/serve.png" --no-progress 2>&1 | tee "$OUT/serve.log"
  kill "$server"; wait "$server"
fi
