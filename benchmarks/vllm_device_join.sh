#!/usr/bin/env bash
# Run ON the GPU machine, in the repository root, in every device call that
# carries a .vllm-partsN/ folder made by benchmarks/vllm_bundle.sh. It stashes
# the carried part(s) in /tmp/vllm-parts/ (which outlives the call while the
# machine stays warm); once all N parts named by the manifest are there, it
# checks the archive's sha256, unpacks it into /tmp/vllm-site, prints
# "vllm ready" and smoke-tests `import vllm` with that folder on PYTHONPATH.
# Exit status: 0 when ready, 3 when parts are still missing, 1 on an error.
set -euo pipefail

stash=/tmp/vllm-parts
site=/tmp/vllm-site
mkdir -p "$stash"
shopt -s nullglob
for dir in .vllm-parts[0-9]*; do
    for f in "$dir"/vllm-site.tar.xz.part*; do
        cp -f "$f" "$stash/"
        echo "stashed $(basename "$f") ($(stat -c %s "$f") bytes)"
    done
    cp -f "$dir/manifest.txt" "$stash/manifest.txt"
done
if [ ! -f "$stash/manifest.txt" ]; then
    echo "no manifest: carry a .vllm-partsN folder" >&2
    exit 1
fi
want=$(sed -n 's/^parts=//p' "$stash/manifest.txt")
sha=$(sed -n 's/^sha256=//p' "$stash/manifest.txt")
parts=("$stash"/vllm-site.tar.xz.part*)
have=${#parts[@]}
echo "parts: $have of $want in $stash"

if [ -f "$site/.sha256" ] && [ "$(cat "$site/.sha256")" = "$sha" ]; then
    echo "already unpacked in $site"
elif [ "$have" -lt "$want" ]; then
    exit 3
else
    got=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$sha" ]; then
        echo "sha256 mismatch: got $got, want $sha" >&2
        exit 1
    fi
    rm -rf "$site"
    mkdir -p "$site"
    if command -v xz >/dev/null; then
        cat "${parts[@]}" | xz -dc -T0 | tar -C "$site" -xf -
    else
        cat "${parts[@]}" | python3 -c 'import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode="r|").extractall(sys.argv[1])' "$site"
    fi
    echo "$sha" > "$site/.sha256"
    du -sh "$site"
fi
echo "vllm ready"
PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} python3 -c '
import torch, vllm
import vllm.vllm_flash_attn.flash_attn_interface as fa
print("vllm", vllm.__version__, "torch", torch.__version__,
      "cuda", torch.cuda.is_available(),
      "FA2", fa.FA2_AVAILABLE, "FA3", fa.FA3_AVAILABLE)
import vllm._C_stable_libtorch  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
print("vllm import ok")
'
