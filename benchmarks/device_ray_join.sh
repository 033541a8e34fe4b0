#!/usr/bin/env bash
# Run ON the GPU machine, in the repository root, in each of the two calls that carry
# .raywhl1/ and .raywhl2/ (made by scripts/device_ray_wheels.sh). It stashes the carried
# part in /root/ray-parts/, which outlives a call while the machine stays warm. Once both
# parts are there, it checks the joined tar's sha256 and installs its wheels into
# /tmp/ray-site, then imports ray.serve with that folder on PYTHONPATH.
# Exit status: 0 when installed, 3 while a part is still missing, 1 on an error.
#   bash benchmarks/device_ray_join.sh && export PYTHONPATH=$PWD:/tmp/ray-site
set -euo pipefail
stash=/root/ray-parts
site=/tmp/ray-site
mkdir -p "$stash"
shopt -s nullglob
for dir in .raywhl1 .raywhl2; do
  for f in "$dir"/part_*; do
    cp -f "$f" "$stash/" && echo "stashed $(basename "$f")"
  done
  [ -f "$dir/sha256" ] && cp -f "$dir/sha256" "$stash/sha256"
done
parts=("$stash"/part_*)
if [ -f "$site/.installed" ] && [ "$(cat "$site/.installed")" = "$(cat "$stash/sha256")" ]; then
  echo "ray already installed in $site"
  exit 0
fi
if [ ${#parts[@]} -lt 2 ]; then
  echo "parts: ${#parts[@]} of 2 in $stash"
  exit 3
fi
want=$(cat "$stash/sha256")
got=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "sha256 mismatch: got $got, want $want" >&2; exit 1; }
rm -rf /tmp/ray-wheels "$site" && mkdir -p /tmp/ray-wheels "$site"
cat "${parts[@]}" | tar x -C /tmp/ray-wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
  /tmp/ray-wheels/*.whl
echo "$want" > "$site/.installed"
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
  "import ray, ray.serve; print('ray', ray.__version__, 'ready:', ray.__file__)"
