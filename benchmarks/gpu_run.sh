#!/usr/bin/env bash
# Everything measured on the GPU machine. Results go to $OUT (or ./out).
#   bash benchmarks/gpu_run.sh [all|check|speed|offline|repeat|serve]...   (default: all)
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
if has repeat; then
  python3 benchmarks/gpu_speed.py --only repeat --json "$OUT/gpu_repeat.json" 2>&1 \
    | tee "$OUT/gpu_repeat.log"
fi
if has serve; then
  if ! python3 -c "import uvicorn, fastapi" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"  # server deps carried as wheels (.whl)
  fi
  python3 -m strata.cli serve --model random:llama-3.2-1b --port 8011 --max-model-len 4096 \
    > "$OUT/serve_server.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf http://127.0.0.1:8011/health > /dev/null && break; sleep 1; done
  python3 -m strata.cli bench serve --url http://127.0.0.1:8011 --num-requests 200 \
    --request-rate 4 16 64 inf --input-len 100-1024 --output-len 100-1024 --seed 0 \
    --json "$OUT/serve.json" --plot "$OUT/serve.png" --no-progress 2>&1 | tee "$OUT/serve.log"
  kill "$server"; wait "$server"
fi
