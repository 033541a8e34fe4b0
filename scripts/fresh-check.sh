#!/usr/bin/env bash
# A new user's first minutes: a throwaway venv, a clean clone of HEAD (committed work
# only), and the README's two commands, run exactly as the README states them, timed.
#   scripts/fresh-check.sh [--keep]      --keep leaves the folder for a look afterwards
# CI=true is set as CI sets it (the remote-tier tests then fail instead of skipping).
set -uo pipefail
repo="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
work="$(mktemp -d /tmp/strata-fresh.XXXXXX)"
[ "${1:-}" = "--keep" ] || trap 'rm -rf "$work"' EXIT  # --keep: logs in $work/command*.log
git clone -q "$repo" "$work/strata"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
export CI=true STRATA_CACHE_DIR="$work/cache"
cd "$work/strata"
mapfile -t commands < <(awk '/^```bash/{inside=1; next} /^```/{if (inside) exit} inside' README.md)
[ "${#commands[@]}" = 2 ] || { echo "README: expected two commands in its first block"; exit 2; }
names=("main job" "tests")
codes=(); times=()
for i in 0 1; do
  echo "== ${names[$i]}: ${commands[$i]}"
  start=$(date +%s.%N)
  bash -c "${commands[$i]}" > "$work/command$i.log" 2>&1
  codes+=("$?")
  grep -v "is ignored: it is neither a file nor a directory" "$work/command$i.log" | tail -n 12
  grep -E "^(FAILED|ERROR) " "$work/command$i.log"
  times+=("$(echo "$(date +%s.%N) - $start" | bc)")
done
echo
echo "commit $(git rev-parse --short HEAD), $(python3 --version), pip $(pip --version | cut -d' ' -f2)," \
  "torch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)"
printf '%-9s %-6s %9s  %s\n' command status wall_s line
for i in 0 1; do
  status=pass; [ "${codes[$i]}" = 0 ] || status="FAIL(${codes[$i]})"
  printf '%-9s %-6s %9.1f  %s\n' "${names[$i]%% *}" "$status" "${times[$i]}" "${commands[$i]}"
done
[ "${codes[0]}" = 0 ] && [ "${codes[1]}" = 0 ]
