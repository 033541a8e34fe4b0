#!/usr/bin/env bash
# The carried folders of benchmarks/gpu_owed.sh, made here (all ignored by git):
#   .srvwhl/  the server's packages the device lacks (scripts/device_server_wheels.sh)
#   .gwhl/    xgrammar and apache-tvm-ffi at the lock's versions (46 MiB)
#   .gl_tok/  the Llama-3.2-1B config (config.json) and the Llama-3-8B one (config_8b.json)
#             beside the embedded model's tokenizer
#   .whl/     redis and hiredis at the lock's versions
#   .redis/   this machine's redis-server and the shared libraries it loads
#   .before/  with REV given: REV's strata/ package, which grammar's stage compares against
#   .spy/     py-spy's wheel, for benchmarks/gpu_profiles.sh
#
#   bash scripts/device_owed_carry.sh [REV]
#
# A device call carries at most 64 MiB: grammar (.gwhl .srvwhl .gl_tok [.before]) and
# tiers (.whl .redis) go in separate calls. Each call's command (one archive comes back):
#   R=$OUT; OUT=/tmp/o bash benchmarks/gpu_owed.sh STAGES; tar czf $R/owed.tgz -C /tmp/o .
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_wheels.sh
source scripts/device_wheels.sh
device_wheels_ignore .gwhl .gl_tok .redis .before .spy
bash scripts/device_server_wheels.sh
device_wheels_download requirements/runtime.lock .gwhl xgrammar apache-tvm-ffi
device_wheels_download requirements/runtime.lock .whl redis hiredis
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_5_x86_64 -d .spy "py-spy==0.4.1"  # a profiler; Strata does not import it
# what they need beside the device image: each other, and .srvwhl's pydantic
device_wheels_check .gwhl xgrammar apache-tvm-ffi pydantic typing-extensions
device_wheels_check .whl redis hiredis
PYTHONPATH=. python3 scripts/shape_with_tokenizer.py .gl_tok
PYTHONPATH=. python3 -c "
import json
from strata.models.presets import PRESETS
json.dump(PRESETS['llama-3-8b'], open('.gl_tok/config_8b.json', 'w'))"
server=$(command -v redis-server || command -v valkey-server)
rm -rf .redis && mkdir -p .redis/lib
cp "$server" .redis/redis-server
ldd "$server" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|ld-linux[^/]*)\.so' \
  | xargs -r -I{} cp -L {} .redis/lib/
if [ $# -gt 0 ]; then
  rm -rf .before && mkdir .before
  git archive "$1" strata | tar -x -C .before  # the benchmarks are this checkout's
  git rev-parse --short "$1" > .before/.rev
fi
du -sh .srvwhl .gwhl .gl_tok .whl .redis .before .spy 2>/dev/null
