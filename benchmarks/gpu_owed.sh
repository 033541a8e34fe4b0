#!/usr/bin/env bash
# The device runs that issues 18, 19, 23 and 24 still owe, as named stages, each timed,
# with one summary table at the end. Results in $OUT (or ./out).
#   bash benchmarks/gpu_owed.sh [grammar] [http] [fit] [serve] [replicas] [tiers]
#       (default: grammar http fit)
#
# Made on the development machine first: `bash scripts/device_owed_carry.sh` (see it for
# what each stage carries; grammar's xgrammar wheel and tiers' redis-server do not fit
# one call together, so tiers goes in a call of its own).
#   grammar  issue 23: grammar_overhead.py engine, 1B shape with the SmolLM2 tokenizer
#            (.gl_tok/), 256 requests, half JSON-constrained, overlap on; the tree in
#            .before/ too when carried (git archive of the commit to compare against);
#            then the 8B shape, where steps are GPU-bound. Carry .gwhl .srvwhl .gl_tok
#            [.before]
#   http     issue 19: http_front.py, offline against HTTP behind 1 and 4 front
#            processes (--api-server-count), each driven from 1 and from 4 load-generator
#            processes (--client-processes), 1B shape. Carry .srvwhl
#   fit      issue 24: sim_fit.py on the GPU, 1B shape: the simulator's step cost of a
#            GPU replica (for P:D ratios). No carry
#   serve    issue 19: vllm_side_by_side.py --only serve --engines strata at 4,096 and
#            8,192 batched tokens a step (the TTFT tail under load), the load generator in
#            4 processes; and at 4,096 from one process, as the earlier runs measured, to
#            show how much of the tail was the client's. Carry .srvwhl
#   tiers    issue 18: gpu_tiers.sh with CODECS="none int4 fp8", QA only. Carry .whl
#            .redis
#   replicas issue 24: replicas_routing.py, two replicas of the 1B shape sharing the GPU
#            (--replica-gpus 0.5), kv-aware against round-robin. Needs Ray Serve in
#            /tmp/ray-site, which the device image lacks (about 100 MB of wheels, over one
#            call's 64 MiB): scripts/device_ray_wheels.sh here, then two calls on one warm
#            machine carrying .raywhl1 and then .raywhl2 (with .srvwhl .gl_tok), each
#            starting with `bash benchmarks/device_ray_join.sh`
# Shorter runs, for a call with little device time left: GRAMMAR_8B=0 skips the 8B grammar
# run; HTTP_FRONTS and HTTP_CLIENTS (default 1,4 each) choose the HTTP modes; SERVE_RUNS
# ("BUDGET PROCESSES" pairs joined by ';', default "4096 4;8192 4;4096 1") the serve runs.
# shellcheck source=benchmarks/gpu_stages.sh
source "$(dirname "$0")/gpu_stages.sh" "grammar http fit" "$@"
site=()
for dir in .gwhl .srvwhl; do
  [ -d "$dir" ] && site+=("$dir"/*.whl)
done
[ ${#site[@]} -gt 0 ] && wheels "${site[@]}"
summary=()
stage() {  # stage NAME COMMAND...: run it, time it, note its exit status
  local name=$1 start=$SECONDS status
  shift
  echo "== $name"
  "$@"
  status=$?
  [ $status = 0 ] && status=ok || status="exit $status"
  summary+=("| $name | $((SECONDS - start)) s | $status |")
}
grammar() {  # grammar TAG TREE CONFIG
  PYTHONPATH="$2:${PYTHONPATH#"$PWD":}" python3 benchmarks/grammar_overhead.py engine \
    --model "random:$PWD/.gl_tok/$3" --num-requests 256 --output-len 256 --overlap on 2>&1 \
    | tee "$OUT/grammar_$1.log" | tail -5
}
if has grammar; then
  stage "grammar 1B" grammar 1b "$PWD" config.json
  [ -d .before ] && stage "grammar 1B, .before" grammar 1b_before "$PWD/.before" config.json
  [ -f .gl_tok/config_8b.json ] && [ "${GRAMMAR_8B:-1}" = 1 ] \
    && stage "grammar 8B" grammar 8b "$PWD" config_8b.json
fi
http() {
  python3 benchmarks/http_front.py --model random:llama-3.2-1b --device cuda \
    --vocab-size 128256 --num-requests 1024 --input-len 100-1024 --output-len 100-1024 \
    --concurrency 256 --repeats 1 --api-server-count "${HTTP_FRONTS:-1,4}" \
    --client-processes "${HTTP_CLIENTS:-1,4}" \
    --no-in-process 2>&1 \
    | tee "$OUT/http_front.log" | tail -10
}
fit() {
  python3 benchmarks/sim_fit.py --model random:llama-3.2-1b --device cuda \
    --prefill-lengths 128 512 1024 2048 --decode-batches 1 16 64 256 \
    --decode-contexts 512 2048 --repeats 1 --out "$OUT/llama1b_gpu_fit.json" 2>&1 | tail -6
}
serve() {  # serve BUDGET CLIENT_PROCESSES
  python3 benchmarks/vllm_side_by_side.py --only serve --engines strata \
    --strata-serve-batched-tokens "$1" --serve-client-processes "$2" \
    --json "$OUT/serve_$1_c$2.json" 2>&1 | tail -22
}
replicas() {
  [ -d /tmp/ray-site ] && export PYTHONPATH="$PYTHONPATH:/tmp/ray-site"
  python3 -c "import ray.serve" || { echo "no Ray Serve here (see the header)"; return 1; }
  python3 benchmarks/replicas_routing.py --model "random:$PWD/.gl_tok/config.json" \
    --routers kv-aware,round-robin --json "$OUT/replicas_gpu.json" \
    --server-args "--device cuda --replica-gpus 0.5 --gpu-memory-utilization 0.4" 2>&1 \
    | tail -12
}
has http && stage http http
has fit && stage fit fit
if has serve; then
  IFS=';' read -r -a runs <<< "${SERVE_RUNS:-4096 4;8192 4;4096 1}"
  for run in "${runs[@]}"; do
    read -r budget procs <<< "$run"
    stage "serve $budget, $procs client processes" serve "$budget" "$procs"
  done
fi
has replicas && stage replicas replicas
if has tiers; then
  stage tiers env CODECS="none int4 fp8" TIER_IO=0 bash benchmarks/gpu_tiers.sh --skip-chat
fi
printf '\n| stage | wall | status |\n|---|---|---|\n'
printf '%s\n' "${summary[@]}"
