#!/usr/bin/env bash
# Refresh the locks that install.sh installs from: every dependency but torch, pinned.
#   scripts/lock.sh            resolve the newest releases pyproject.toml allows
#   scripts/lock.sh --upgrade-package NAME   (any extra flags go to `uv pip compile`)
# The locks are for CPython 3.11 on Linux x86_64 (the development and CI machines).
# Resolved against torch==2.13.0 (requirements/torch.txt), the CPU build these machines
# carry in /opt/wheels, so torch's own dependencies are pinned too but torch itself is not:
# install.sh keeps an existing torch.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q "uv>=0.9"
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
compile() {  # compile OUTPUT [--extra NAME]
  local out="$1"; shift
  uv pip compile pyproject.toml "$@" --constraint requirements/torch.txt "${links[@]}" \
    --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
    --no-emit-package torch --no-header --quiet --output-file "$out" "${EXTRA_FLAGS[@]}"
}
EXTRA_FLAGS=("$@")
compile requirements/runtime.lock
compile requirements/test.lock --extra test
echo "wrote requirements/runtime.lock ($(grep -c '==' requirements/runtime.lock) pins)" \
  "and requirements/test.lock ($(grep -c '==' requirements/test.lock) pins)"
