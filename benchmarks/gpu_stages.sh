# Sourced by the GPU scripts that run named stages:
#   source "$(dirname "$0")/gpu_stages.sh" "DEFAULT STAGES" "$@"
# Leaves the caller in the repository root with $OUT made, the repository on PYTHONPATH,
# `has STAGE` true for each stage asked for (the defaults when none is), `wheels WHEEL...`
# to install carried wheels, and the GPU's name, memory and driver in $OUT/gpu.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
defaults=$1; shift
stages=" ${*:-$defaults} "
has() { [[ "$stages" == *" $1 "* ]]; }
wheels() {  # carried wheels into /tmp/site, on PYTHONPATH
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$@" > /dev/null && export PYTHONPATH="$PYTHONPATH:/tmp/site"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
