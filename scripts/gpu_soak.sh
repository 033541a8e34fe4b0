#!/usr/bin/env bash
# The GPU soak of issue 22: scripts/soak.py against `strata serve` of the Llama-3.2-1B
# shape with random weights on CUDA, a CPU and a disk tier under a 1 GiB GPU pool, blocks
# authenticated and encrypted with a store secret. .gl_tok/ holds the shape's config.json
# and a tokenizer (made by scripts/shape_with_tokenizer.py; carried, never committed).
# The GPU pool and the CPU tier hold 1,024 blocks each (float32: 1 MiB a block); the
# soak's warm-up writes twice the GPU pool, so the greedy prompts come back from disk.
#
#   bash scripts/gpu_soak.sh        # from the repo root of a checkout with .whl/ and .gl_tok/
#
# For a machine without Strata's server dependencies: the wheels in .whl/ are unpacked into
# $SOAK_SITE and put first on PYTHONPATH; they hold none of torch, triton, transformers or
# their dependencies, so the machine's own are used. Everything ends within $SOAK_BUDGET_S
# seconds of the start (a device command may run 600 s): the load ends early enough to
# leave time to drain, check and report, so it lasts $SOAK_SECONDS or less.
# Writes into $OUT: soak.json (the counts), soak.txt (the table), server.log (gzipped if
# large) and env.txt (versions, and where torch and transformers were imported from).
#
# Settings (environment), with their defaults:
#   SOAK_CONFIG=.gl_tok/config.json  SOAK_DEVICE=cuda  SOAK_DTYPE=float32
#   SOAK_SECONDS=600  SOAK_BUDGET_S=570  SOAK_THREADS=16  SOAK_MAX_LEN=4096
#   SOAK_GPU_KV=1  SOAK_CPU_KV=1  SOAK_DISK_KV=8  (GiB)
#   SOAK_NO_INSTALL=1 skips the wheels (a machine with Strata installed); SOAK_WHEELS=.whl
#   SOAK_SITE=/tmp/site  SOAK_PYTHON=python3  OUT=out
# float32: random weights give logits whose top two are often closer than bfloat16's
# rounding, so a greedy token could differ between a batch and a solo run for want of
# precision, not for a fault; the soak requires them equal.
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
py=${SOAK_PYTHON:-python3}
export PYTHONUNBUFFERED=1
out=${OUT:-out}
work=$(mktemp -d /tmp/strata-soak.XXXXXX)
mkdir -p "$out"

if [[ "${SOAK_NO_INSTALL:-0}" != 1 ]]; then
    site=${SOAK_SITE:-/tmp/site}
    wheels=("${SOAK_WHEELS:-.whl}"/*.whl)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}" 2>/dev/null ||
        "$py" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
    "$py" -c 'import sys, torch, transformers, fastapi, uvicorn
print(sys.version.split()[0], "torch", torch.__version__, torch.__file__)
print("cuda", torch.version.cuda, torch.cuda.is_available())
print("transformers", transformers.__version__, transformers.__file__)
print("fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__, fastapi.__file__)'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

config=${SOAK_CONFIG:-.gl_tok/config.json}
if [[ ! -f "$config" ]]; then
    echo "no $config: make it with PYTHONPATH=. python3 scripts/shape_with_tokenizer.py .gl_tok" >&2
    exit 2
fi
budget=${SOAK_BUDGET_S:-570}
head -c 32 /dev/urandom >"$work/secret"
set +e
timeout $((start + budget - $(date +%s))) "$py" scripts/soak.py \
    --model "random:$config" --device "${SOAK_DEVICE:-cuda}" \
    --duration "${SOAK_SECONDS:-600}" --load-until $((start + budget - 45)) \
    --concurrency "${SOAK_THREADS:-16}" --json "$out/soak.json" --server-log "$out/server.log" \
    -- --dtype "${SOAK_DTYPE:-float32}" --max-model-len "${SOAK_MAX_LEN:-4096}" \
    --kv-cache-memory "${SOAK_GPU_KV:-1}" --kv-cpu-memory "${SOAK_CPU_KV:-1}" \
    --kv-disk-dir "$work/kv" --kv-disk-size "${SOAK_DISK_KV:-8}" \
    --kv-store-secret-file "$work/secret" --kv-store-encrypt | tee "$out/soak.txt"
rc=${PIPESTATUS[0]}
set -e
if [[ -f "$out/server.log" ]] && (($(stat -c %s "$out/server.log") > 8000000)); then  # a file comes back if under 16 MiB
    gzip "$out/server.log"
fi
echo "soak exit $rc after $(($(date +%s) - start)) s" | tee -a "$out/soak.txt"
rm -rf "$work"
exit "$rc"
