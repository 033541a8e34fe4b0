#!/usr/bin/env bash
# Recall decode of several sequences on the GPU machine (issue 16): sequences decoding
# alone (side by side on CUDA streams) against pages of several, in the same process.
# Results in $OUT.
#   bash benchmarks/gpu_recall_batch.sh [check] [b32k] [b128k] [full128k]
#     check     gpu_recall_check.py: exact at full budget, mixed batches equal solo runs,
#               pages equal solo runs, graphs equal eager
#     b32k      32k context: batch 1 (full, quest, shadowkv), then batch 8 with pages of
#               $ROWS32 rows (default 1,4,8; 1: each sequence decodes alone, side by side)
#     b128k     128k context, recall policies at batch $B128 (default 4), pages of $ROWS128
#               rows (default 1,4)
#     max128k   128k context, each recall policy at the largest batch the host holds:
#               quest at $BQ (default 6; 0: none; keys and values, 16 GiB a sequence: with shared
#               prefixes the store keeps the dense layers too), shadowkv at $BS (default
#               10: 8 GiB a sequence once its keys are fitted, 16 GiB while it
#               prefills), in pages of up to 8 rows ($PRS for shadowkv); WSF (default 1): the
#               working-set factor of every recall run
#     steps128k 128k context, quest and shadowkv at batch $BSG (default 4) in one page, eager
#               steps around per-layer page graphs, then whole steps from one CUDA graph each
#     overlap128k  128k context, quest at batch $BSG (default 4) in one page, whole-step
#               graphs, recall steps synchronous, then overlapped (--overlap-recall)
#     rebuild128k  the recall kernels' tests on the GPU (rebuilt keys, working-set update),
#               then 128k context, shadowkv at batch $BSG (default 4) in one page: keys
#               rebuilt by the torch path, then by the kernel
#     update128k  128k context, quest and shadowkv at batch $BSG (default 4) in one page: the
#               working set updated and filled by torch ops, then by one kernel each a layer
#     kernels32k  32k context, quest and shadowkv at batch $BSG (default 4) in one page: the
#               recall kernels (block scores, working-set update, fetch, rebuilt keys, page
#               attention) all off, then all on (on is the engine default on CUDA)
#     wsf128k   128k context, shadowkv at batch $BW (default 8) in one page, for each
#               working-set factor of $WSFS (default "1 4"); FS ("both", default engine):
#               the values fetched beside the rebuilt keys on a side stream, or not
#     policies128k  128k context, batch $BP128 (default 4) in one page: each selecting policy
#               ($PMODES128) without the cross-layer prefetch, magicpig alone at batch 1
#               (its host time per layer against the step: recall_sampled_*), then with it
#     policies32k  32k context, batch $BPOL (default 4) in one page: full attention and
#               each recall policy ($PMODES32; magicpig decodes each sequence alone), $PSTEPS
#               timed steps (default 8)
#     prefetch128k  128k context, shadowkv at batch $BP (default 8) in one page: without,
#               then with the cross-layer prefetch (--prefetch)
#     gather    the row fetch's rate by host buffer size, row size, pinning and kernel
#               variant (uva_gather_sweep.py $GATHER_ARGS; plot in $OUT/gather.png)
#     full128k  128k context, full attention in the GPU pool at batch $FULLB (default "1 3")
#     dense128k 128k context, quest and shadowkv at batch $BD (default 4) in one page, with
#               the dense layers' decode by batched matmuls, then by the split-K kernel
#     profile   quest and shadowkv ($PMODES) at $PCTX tokens (default 32768), batch $PBATCH
#               (default 4), under torch.profiler: eager, or in CUDA graphs with one page of
#               all rows when PGRAPHS=1
# SPEED_ARGS: arguments added to every recall_speed.py run (e.g. "--recall-kernels on")
# shellcheck source=benchmarks/gpu_stages.sh
source "$(dirname "$0")/gpu_stages.sh" "check b32k" "$@"
free -g | tee -a "$OUT/gpu.txt"
speed() {  # WSF: kv_recall_working_set_factor (default 1); SPEED_ARGS: more arguments
  # shellcheck disable=SC2086  # SPEED_ARGS: several arguments
  python3 benchmarks/recall_speed.py --working-set-factor "${WSF:-1}" "$@" ${SPEED_ARGS:-} 2>&1 |
    grep -v '^  '
}
if has check; then
  python3 benchmarks/gpu_recall_check.py 2>&1 | tee "$OUT/check.log" | tail -12
fi
if has b32k; then
  speed --only uva,decode --contexts 32768 --batch 1 --modes full,quest,shadowkv --steps 16 \
    --json "$OUT/b32k_1.json"
  speed --only decode --contexts 32768 --batch 8 --modes full,quest,shadowkv --steps 16 \
    --page-rows "${ROWS32:-1,4,8}" --pool-gib 36 --recall-gpu-gib 12 --host-gib 40 \
    --json "$OUT/b32k_8.json"
fi
if has b128k; then
  b="${B128:-4}"  # 15 GiB of host store each; 6 (96 GiB pinned) failed on a 125 GiB host
  speed --only decode --contexts 131072 --batch "$b" --modes quest,shadowkv --steps 12 \
    --page-rows "${ROWS128:-1,4}" \
    --pool-gib 17 --recall-gpu-gib $((3 * b + 2)) --host-gib $((17 * b)) --json "$OUT/b128k.json"
fi
if has max128k; then
  bq="${BQ:-6}" bs="${BS:-10}"
  [ "$bq" -gt 0 ] && speed --only decode --contexts 131072 --batch "$bq" --modes quest --steps 8 \
    --page-rows 8 --slack 200 --pool-gib 4 --recall-gpu-gib $(((2 + ${WSF:-1}) * bq + 2)) \
    --host-gib $((16 * bq + 1)) --json "$OUT/max128k_quest.json"
  speed --only decode --contexts 131072 --batch "$bs" --modes shadowkv --steps 8 --page-rows "${PRS:-8}" --slack 200 \
    --pool-gib 4 --recall-gpu-gib $(((3 + ${WSF:-1}) * bs + 2)) --host-gib $((8 * bs + 9)) \
    --json "$OUT/max128k_shadowkv.json"
fi
if has profile; then  # eager by default, so the table shows each kernel's CUDA time
  ctx="${PCTX:-32768}" b="${PBATCH:-4}" how=(--eager)
  [ -n "${PGRAPHS:-}" ] && how=(--page-rows "$b")
  python3 benchmarks/recall_speed.py --only decode --contexts "$ctx" --batch "$b" "${how[@]}" \
    --profile --trace-dir "$OUT" --modes "${PMODES:-quest,shadowkv}" \
    --steps 4 --warmup 1 --slack 200 --recall-gpu-gib $((4 * b + 4)) --pool-gib 4 \
    --host-gib $(( (ctx / 8192 + 1) * b + 4 )) > "$OUT/profile.log" 2>&1
  grep -E "^\{|Self CUDA time total|Self CPU time total" "$OUT/profile.log"
  for trace in "$OUT"/*.json.gz; do
    echo "== $trace"; python3 benchmarks/trace_summary.py "$trace" --top 30
  done
fi
if has dense128k; then
  b="${BD:-4}"
  speed --only decode --contexts 131072 --batch "$b" --modes quest,shadowkv --steps 16 \
    --page-rows "$b" --slack 200 --dense-kernel both --pool-gib 4 \
    --recall-gpu-gib $((4 * b + 4)) --host-gib $((16 * b + 4)) --json "$OUT/dense128k.json"
fi
if has steps128k; then
  b="${BSG:-4}"
  speed --only decode --contexts 131072 --batch "$b" --modes quest,shadowkv --steps 16 \
    --page-rows "$b" --slack 200 --step-graphs both --pool-gib 4 \
    --recall-gpu-gib $((4 * b + 4)) --host-gib $((16 * b + 4)) --json "$OUT/steps128k.json"
fi
if has overlap128k; then
  b="${BSG:-4}"
  for how in "" --overlap-recall; do
    speed --only decode --contexts 131072 --batch "$b" --modes quest --steps 16 --page-rows "$b" \
      --slack 200 $how --pool-gib 4 --recall-gpu-gib $((4 * b + 4)) --host-gib $((16 * b + 4)) \
      --json "$OUT/overlap128k${how:+_on}.json"
  done
fi
if has rebuild128k; then
  python3 -m pytest -q -p no:cacheprovider tests/test_recall_rebuild_kernel.py \
    tests/test_recall_working_set_kernel.py tests/test_recall_fetch_kernel.py 2>&1 | tail -3
  b="${BSG:-4}"
  speed --only decode --contexts 131072 --batch "$b" --modes shadowkv --steps 16 --page-rows "$b" \
    --slack 200 --rebuild-kernel both --pool-gib 4 --recall-gpu-gib $((4 * b + 4)) \
    --host-gib $((16 * b + 4)) --json "$OUT/rebuild128k.json"
fi
if has update128k; then
  b="${BSG:-4}"
  speed --only decode --contexts 131072 --batch "$b" --modes quest,shadowkv --steps 16 \
    --page-rows "$b" --slack 200 --update-kernel both --fetch-kernel both --pool-gib 4 \
    --recall-gpu-gib $((4 * b + 4)) --host-gib $((16 * b + 4)) --json "$OUT/update128k.json"
fi
if has kernels32k; then
  b="${BSG:-4}"
  speed --only decode --contexts 32768 --batch "$b" --modes quest,shadowkv --steps 16 \
    --page-rows "$b" --slack 200 --recall-kernels both --pool-gib 4 \
    --recall-gpu-gib $((4 * b + 4)) --host-gib $((5 * b + 4)) --json "$OUT/kernels32k.json"
fi
if has wsf128k; then
  b="${BW:-8}"
  for wsf in ${WSFS:-1 4}; do  # GPU: 3.75 GiB a sequence, and a quarter per factor
    WSF="$wsf" speed --only decode --contexts 131072 --batch "$b" --modes shadowkv --steps 8 \
      --page-rows "$b" --slack 200 --fetch-stream "${FS:-engine}" --pool-gib 4 \
      --recall-gpu-gib $(((15 + wsf) * b / 4 + 2)) --host-gib $((8 * b + 9)) \
      --json "$OUT/wsf128k_$wsf.json"
  done
fi
if has prefetch128k; then
  b="${BP:-8}"
  for how in "" --prefetch; do
    speed --only decode --contexts 131072 --batch "$b" --modes shadowkv --steps 8 --page-rows "$b" \
      --slack 200 $how --pool-gib 4 --recall-gpu-gib $((4 * b + 2)) --host-gib $((8 * b + 9)) \
      --json "$OUT/prefetch128k${how:+_on}.json"
  done
fi
if has policies128k; then  # issue 17's speed table: every recall policy, prefetch off and on
  b="${BP128:-4}"
  selecting() {  # $1: "" or --prefetch; the pool holds one 128k sequence at any batch
    # shellcheck disable=SC2086  # an empty $1 adds no argument
    speed --only decode --contexts 131072 --batch "$b" --steps "${PSTEPS:-8}" --page-rows "$b" \
      --modes "${PMODES128:-quest,shadowkv,clusterkv,pqcache}" --slack 200 $1 --pool-gib 4 \
      --recall-gpu-gib $((4 * b + 2 > 14 ? 4 * b + 2 : 14)) --host-gib $((16 * b + 9)) \
      --json "$OUT/policies128k${1:+_prefetch}.json"
  }
  selecting ""
  speed --only decode --contexts 131072 --batch 1 --steps 4 --modes magicpig --slack 200 \
    --pool-gib 4 --recall-gpu-gib 14 --host-gib 32 --json "$OUT/magicpig128k.json"
  selecting --prefetch
fi
if has policies32k; then  # every recall policy beside full attention, one process
  speed --only decode --contexts 32768 --batch "${BPOL:-4}" --steps "${PSTEPS:-8}" \
    --modes "${PMODES32:-full,quest,shadowkv,clusterkv,pqcache,magicpig}" --page-rows "${BPOL:-4}" \
    --pool-gib 20 --recall-gpu-gib 16 --host-gib 40 --json "$OUT/policies32k.json"
fi
if has gather; then
  # shellcheck disable=SC2086  # GATHER_ARGS: several arguments
  python3 benchmarks/uva_gather_sweep.py ${GATHER_ARGS:-} --json "$OUT/gather.json" \
    --png "$OUT/gather.png" 2>&1 | tr '\r' '\n' | grep -v "it/s"
fi
if has full128k; then
  for b in ${FULLB:-1 3}; do
    speed --only decode --contexts 131072 --batch $b --modes full --steps 12 \
      --pool-gib 52 --recall-gpu-gib 1 --host-gib 1 --json "$OUT/full128k_$b.json"
  done
fi
