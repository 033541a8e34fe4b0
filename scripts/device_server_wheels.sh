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
# shellcheck source=scripts/device_wheels.sh
source scripts/device_wheels.sh
rm -rf .srvwhl
device_wheels_download requirements/runtime.lock .srvwhl "${CARRIED[@]}"
device_wheels_check .srvwhl "${CARRIED[@]}"
du -sh .srvwhl
