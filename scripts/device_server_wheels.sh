#!/usr/bin/env bash
# The server's packages that the device image lacks, as wheels for a device call
# (benchmarks/gpu_overlap.sh http, http_front.py, the soak): each at the version
# requirements/runtime.lock pins, for the device's Python (3.12, manylinux x86_64).
#
#   bash scripts/device_server_wheels.sh        # writes .srvwhl/ (ignored by git)
#
# Then every requirement of every wheel must be carried too or be in the device image
# (DEVICE_HAS, from the device's package list): the script stops naming any that is
# neither, so that a server that cannot import is found here and not on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRIED=(fastapi starlette uvicorn pyzmq pydantic pydantic-core annotated-types
         typing-inspection typing-extensions opentelemetry-api)
DEVICE_HAS=" anyio annotated-doc click h11 cffi "
pins=()
for name in "${CARRIED[@]}"; do
  pin=$(grep -E "^${name}==" requirements/runtime.lock) || {
    echo "$name is not pinned in requirements/runtime.lock" >&2
    exit 1
  }
  pins+=("$pin")
done
rm -rf .srvwhl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .srvwhl "${pins[@]}"
carried=" ${CARRIED[*]} "
missing=()
for wheel in .srvwhl/*.whl; do
  # Requires-Dist lines that hold without extras, by name (normalised as pip does)
  while read -r need; do
    [[ -z $need || $carried == *" $need "* || $DEVICE_HAS == *" $need "* ]] && continue
    missing+=("$(basename "$wheel"): $need")
  done < <(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist:' \
           | grep -v 'extra ==' | sed -E 's/^Requires-Dist: *([A-Za-z0-9._-]+).*/\1/' \
           | tr 'A-Z_.' 'a-z--')
done
if [ ${#missing[@]} -gt 0 ]; then
  printf 'needed, neither carried nor on the device: %s\n' "${missing[@]}" >&2
  exit 1
fi
du -sh .srvwhl
