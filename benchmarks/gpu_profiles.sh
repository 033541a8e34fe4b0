#!/usr/bin/env bash
# Where the host time goes, on the GPU machine (issues 23 and 19):
#   bash benchmarks/gpu_profiles.sh [grammar] [knobs] [contention] [big] [http]
#       (default: grammar http)
#
#   grammar  grammar_overhead.py engine, 1B shape with the SmolLM2 tokenizer (.gl_tok/),
#            256 requests, half JSON-constrained, overlap on: the host time of each part
#            of a step (--phases), the host's waits for the device (--sync-debug), and a
#            py-spy profile of each run's threads. Carry .gwhl .srvwhl .gl_tok .spy
#   knobs    the grammar's host cost (--phases) with the engine's defaults, sampling after
#            the next step's scheduling (--sample-after-schedule), xgrammar's fill on 4
#            threads, and the matchers accepting on the worker too. Carry .gwhl .srvwhl
#            .gl_tok
#   contention  the unconstrained engine beside another process that fills 128 masks
#            every 3 ms on 2 and 8 threads (the cores' contention alone, no GIL shared)
#   big      the grammar run on the Llama-3-8B shape (GPU-bound steps), --phases
#   http     http_front.py --spy, 1B shape, the engine in its own process behind one front,
#            4 load-generator processes: py-spy on the engine offline and behind the front.
#            Carry .srvwhl .spy
#
# .spy/ holds py-spy's wheel (scripts/device_owed_carry.sh). The py-spy profiles come back
# as raw collapsed stacks (benchmarks/spy_summary.py reads them) beside their summaries.
# shellcheck source=benchmarks/gpu_stages.sh
source "$(dirname "$0")/gpu_stages.sh" "grammar http" "$@"
nproc; python3 -c "import os; print('cpu_count', os.cpu_count(), 'affinity', len(os.sched_getaffinity(0)))"
grep -m1 "model name" /proc/cpuinfo; grep -c "^processor" /proc/cpuinfo
site=()
for dir in .gwhl .srvwhl .spy; do
  [ -d "$dir" ] && site+=("$dir"/*.whl)
done
[ ${#site[@]} -gt 0 ] && wheels "${site[@]}"
spy() {  # spy NAME COMMAND...: COMMAND under py-spy, every thread and process, waits included
  /tmp/site/bin/py-spy record --nonblocking --idle --threads --subprocesses --rate 250 \
    --format raw -o "$OUT/spy_$1.txt" -- "${@:2}"
}
engine() {  # engine FLAGS...: the grammar benchmark on the 1B shape
  python3 benchmarks/grammar_overhead.py engine --model "random:$PWD/.gl_tok/config.json" \
    --overlap on "$@"
}
if has grammar; then
  echo "== grammar: phases"
  engine --num-requests 256 --output-len 256 --repeats 2 --phases 2>&1 | tee "$OUT/phases.log"
  echo "== grammar: host syncs"
  engine --num-requests 256 --output-len 64 --repeats 1 --sync-debug 2>&1 \
    | grep -A14 -e "--- host syncs" | tee "$OUT/syncs.log"
  echo "== grammar: py-spy"
  spy grammar python3 benchmarks/grammar_overhead.py engine \
    --model "random:$PWD/.gl_tok/config.json" --overlap on --num-requests 256 \
    --output-len 256 --repeats 1 2>&1 | tail -4
  for run in constrained unconstrained; do
    python3 benchmarks/spy_summary.py "$OUT/spy_grammar.txt" --scope "generate_$run" \
      --top 30 > "$OUT/spy_grammar_$run.log" 2>&1
    head -40 "$OUT/spy_grammar_$run.log"
  done
fi
if has knobs; then
  # KNOBS: flag sets joined by ';' (an empty one: the defaults)
  IFS=';' read -r -a knobs \
    <<< "${KNOBS:-;--sample-after-schedule;--fill-threads 4;--fill-threads 4 --accept-on-worker}"
  for knob in "${knobs[@]}"; do
    echo "== grammar: ${knob:-defaults}"
    name=${knob:-defaults}
    # shellcheck disable=SC2086
    engine --num-requests 256 --output-len 256 --repeats 2 --phases $knob 2>&1 \
      | tee "$OUT/knob_${name//[^a-z0-9]/_}.log" | tail -24
  done
fi
if has contention; then
  python3 benchmarks/grammar_overhead.py contention --model "random:$PWD/.gl_tok/config.json" \
    --threads 2,8 2>&1 | tee "$OUT/contention.log" | grep -v "masks:"
fi
if has big; then
  echo "== grammar: 8B shape"
  python3 benchmarks/grammar_overhead.py engine --model "random:$PWD/.gl_tok/config_8b.json" \
    --overlap on --num-requests 256 --output-len 256 --repeats 2 --phases 2>&1 \
    | tee "$OUT/grammar_8b.log" | tail -24
fi
if has http; then
  echo "== http: py-spy on the engine, offline and behind the HTTP front"
  PATH="/tmp/site/bin:$PATH" python3 benchmarks/http_front.py --model random:llama-3.2-1b \
    --device cuda --vocab-size 128256 --num-requests 1024 --input-len 100-1024 \
    --output-len 100-1024 --concurrency 256 --repeats 1 --api-server-count 1 \
    --client-processes 4 --no-in-process --spy "$OUT/http_spy" 2>&1 | tail -6
  for f in "$OUT"/http_spy/spy_*.txt; do
    python3 benchmarks/spy_summary.py "$f" --thread MainThread --top 40 > "${f%.txt}.log" 2>&1
    echo "-- $f"; head -45 "${f%.txt}.log"
  done
fi
