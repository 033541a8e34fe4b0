#!/usr/bin/env bash
# `strata bench tiers` on the GPU machine (issue 4): Llama-3-8B shape with random weights
# and a 32k context, documents of 8k/16k/32k tokens, and multi-round chat.
#   bash benchmarks/gpu_tiers.sh [extra strata bench tiers flags]     results in $OUT (or ./out)
#   CODECS="none int4 fp8" TIER_IO=0 bash benchmarks/gpu_tiers.sh --skip-chat   # the codec table
# Carried (git-excluded): .whl/ with the xxhash and redis wheels (and hiredis, optional), and .redis/ with a
# redis-server binary and the shared libraries `ldd` lists (started with LD_LIBRARY_PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import xxhash, redis" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/xxhash-*.whl .whl/redis-*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# hiredis, if carried: redis-py's C reply parser (remote reads 2x faster on the CPU
# machine: docs/benchmarks.md, tier I/O)
if ! python3 -c "import hiredis" 2>/dev/null && ls .whl/hiredis-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/hiredis-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import redis.utils as u; print('hiredis parser:', u.HIREDIS_AVAILABLE)"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nproc; free -g | head -2; uname -r
} 2>&1 | tee "$OUT/gpu.txt"

config=/tmp/llama-3-8b-32k.json
python3 - "$config" <<'EOF'
import json, sys
from strata.models.presets import PRESETS
json.dump(dict(PRESETS["llama-3-8b"], max_position_embeddings=32768), open(sys.argv[1], "w"))
EOF

# the disk tier on a real disk: /tmp is used unless it is a tmpfs (RAM)
disk=/tmp/strata-kv-disk
[ "$(stat -f -c %T /tmp)" = tmpfs ] && disk="$PWD/.kv-disk"
df -h "$(dirname "$disk")" | tail -1 | tee -a "$OUT/gpu.txt"
echo "disk tier in $disk ($(stat -f -c %T "$(dirname "$disk")"))" | tee -a "$OUT/gpu.txt"

remote=()
port=6399
if [ -x .redis/redis-server ]; then
  LD_LIBRARY_PATH="$PWD/.redis/lib" .redis/redis-server --port "$port" --bind 127.0.0.1 \
    --save '' --appendonly no --maxmemory 24gb --maxmemory-policy allkeys-lru \
    --logfile "$OUT/redis.log" &
  server=$!
  for _ in $(seq 50); do
    python3 -c "import redis; redis.Redis(port=$port).ping()" 2>/dev/null && break; sleep 0.2
  done
  if python3 -c "import redis; redis.Redis(port=$port).ping()" 2>/dev/null; then
    remote=(--kv-remote "redis://127.0.0.1:$port/0")
    LD_LIBRARY_PATH="$PWD/.redis/lib" .redis/redis-server --version | tee -a "$OUT/gpu.txt"
  else
    echo "redis-server did not start: remote tier not measured" | tee -a "$OUT/gpu.txt"
    cat "$OUT/redis.log" 2>/dev/null | tail -5
  fi
fi

# the tier I/O alone on this host's cores (issue 18): disk 1 vs N readers, remote reads,
# the engine-thread stand-in beside a write-through; TIER_IO=0 skips it
if [ "${TIER_IO:-1}" = 1 ]; then
  io_remote=()
  [ ${#remote[@]} -gt 0 ] && io_remote=(--redis-url "redis://127.0.0.1:$port/0")
  python3 benchmarks/tier_io_cpu.py --dir "$(dirname "$disk")" "${io_remote[@]}" 2>&1 \
    | tee "$OUT/tier_io.txt"
fi

# one run per tier codec (CODECS, default "none"), each on an emptied disk tier; the
# remote keys of one codec never match another's (the codec is in the namespace)
status=0
for codec in ${CODECS:-none}; do
  rm -rf "$disk"
  [ ${#remote[@]} -gt 0 ] && python3 -c "import redis; redis.Redis(port=$port).flushall()"
  python3 -m strata.cli bench tiers --model "random:$config" \
    --lengths 8192 16384 32000 --docs-per-length 2 --questions 3 \
    --kv-disk-dir "$disk" --kv-disk-size 40 "${remote[@]}" --kv-tier-codec "$codec" \
    --output "$OUT/tiers_$codec.json" --plot "$OUT/tiers_$codec.png" "$@" 2>&1 \
    | tee "$OUT/tiers_$codec.log" || status=1
done
[ -n "${server:-}" ] && kill "$server"
du -sh "$disk" 2>/dev/null
exit $status
