#!/usr/bin/env bash
# Overlap scheduling on the GPU machine (issues 19 and 23), each measure with the overlap
# off (synchronous steps, the engine before) and on, in the same call. Results in $OUT.
#   bash benchmarks/gpu_overlap.sh [check] [offline] [grammar] [decode] [http]
#     check    gpu_check.py --only models: tiny models against HF (graphs, eager, overlap
#              on and off) and overlap against synchronous steps on the 1B shape
#     offline  vllm_side_by_side.py --engines strata, 1B and 8B offline workloads,
#              overlap off then on (JSON: $OUT/sbs_off.json, $OUT/sbs_on.json)
#     grammar  grammar_overhead.py engine (1B shape with the SmolLM2 tokenizer from .gl_tok/,
#              256 requests, half JSON-constrained), overlap off then on; carry .whl/
#              (xgrammar, pydantic) and .gl_tok/ (the 1B config beside tokenizer files)
#     decode   vllm_side_by_side.py --only decode (8B, batch 1, 128/4k/32k), off then on
#     http     http_front.py: offline against HTTP (engine in its own process behind
#              $FRONTS HTTP front processes, default 1,2,4, and in
#              process), 1B; carry .srvwhl/ (the server's packages the device lacks:
#              bash scripts/device_server_wheels.sh)
# shellcheck source=benchmarks/gpu_stages.sh
source "$(dirname "$0")/gpu_stages.sh" "check offline grammar" "$@"
if has grammar && ! python3 -c "import xgrammar" 2>/dev/null; then wheels .whl/*.whl; fi
if has http && ! python3 -c "import fastapi, uvicorn, zmq" 2>/dev/null; then wheels .srvwhl/*.whl; fi
if has check; then
  python3 benchmarks/gpu_check.py --only models 2>&1 | tee "$OUT/gpu_check.log" | tail -25
fi
if has offline; then
  for mode in off on; do
    python3 benchmarks/vllm_side_by_side.py --engines strata --only offline-1b,offline-8b \
      --strata-overlap "$mode" --json "$OUT/sbs_$mode.json" 2>&1 | tail -8
  done
fi
if has grammar; then
  for mode in off on; do
    python3 benchmarks/grammar_overhead.py engine --model "random:$PWD/.gl_tok/config.json" \
      --num-requests 256 --output-len 256 --overlap "$mode" 2>&1 \
      | tee "$OUT/grammar_$mode.log" | tail -5
  done
fi
if has decode; then
  for mode in off on; do
    python3 benchmarks/vllm_side_by_side.py --engines strata --only decode \
      --strata-overlap "$mode" --json "$OUT/decode_$mode.json" 2>&1 | tail -6
  done
fi
if has http; then
  python3 benchmarks/http_front.py --model random:llama-3.2-1b --device cuda --vocab-size 128256 \
    --num-requests 1024 --input-len 100-1024 --output-len 100-1024 --concurrency 256 \
    --repeats 2 --api-server-count "${FRONTS:-1,2,4}" 2>&1 | tee "$OUT/http_front.log" | tail -12
fi
