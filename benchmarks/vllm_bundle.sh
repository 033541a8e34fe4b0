#!/usr/bin/env bash
# Build, on a machine with network access, everything vLLM 0.26.0 needs on
# the offline GPU machine that benchmarks/vllm_side_by_side.py runs on, as
# xz-compressed tar parts small enough to travel with the device calls.
#
# The device already has python 3.12, torch 2.11.0+cu130, triton 3.6,
# transformers 5.17, numpy, tokenizers, aiohttp, ... (KINDS.md's list), so
# the bundle holds vLLM and only the packages that importing vLLM's offline
# path (vllm.LLM, the V1 engine core, executor, GPU worker and both model
# runners, the Llama model, the FLASH_ATTN backend, the sampler, the dummy
# loader) and vllm.entrypoints.openai.api_server needs and the device lacks.
# That list was found by uninstalling everything the device lacks from a
# venv holding torch 2.11.0 and the vllm wheel, then adding back, one round
# at a time, only the distributions an import failed on. That import missed
# prometheus-fastapi-instrumentator: the API server imports it only while
# building its app (vllm.entrypoints.serve.instrumentator.metrics); added
# after the 2026-12-06 bundle (see --extras).
#
# The vllm .so files need libcudart.so.13 and libcuda.so.1 (cu130 builds, as
# the device's torch), and glibc 2.28; llguidance's wheel needs glibc 2.31.
#
# Pruned from the vllm wheel (each checked to be unused on a bf16 Llama run
# on Hopper):
#   vllm_flash_attn/_vllm_fa2_C  FA2; imported under try/except, and
#       fa_utils.get_flash_attn_version picks FA3 on SM 9.x when
#       _vllm_fa3_C is present (keep it with --keep-fa2).
#   _moe_C_stable_libtorch       MoE ops only; the platform imports it
#       under contextlib.suppress(ImportError) (keep it with --keep-moe).
#   vllm-rs                      Rust frontend, only with
#       VLLM_USE_RUST_FRONTEND=1.
#   third_party/deep_gemm        FP8 block GEMMs (found with find_spec).
#   third_party/fmha_sm100       SM100 sparse attention (MiniMax M3).
#
# Usage: benchmarks/vllm_bundle.sh [--out DIR] [--keep-fa2] [--keep-moe] [--extras]
#   --out DIR   where the .vllm-partsN/ folders go (default: the repository
#               root of this checkout; the device tool sends the checkout
#               the session was started in, so point it there)
#   --extras    only download the pure-Python wheels that vLLM's API server
#               imports while it builds its app and that bundles made before
#               they were added lack (prometheus-fastapi-instrumentator), into
#               DIR/.vllm-parts-extra/ (~20 KB); vllm_side_by_side.py unzips
#               them onto vLLM's path when that folder is carried
# Environment: VLLM_BUNDLE_WORK (scratch, default /tmp/vllm-bundle),
#   VLLM_WHEEL (an already downloaded vllm wheel), PART_MIB (default 56).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=$here
keep_fa2=0
keep_moe=0
extras_only=0
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --extras) extras_only=1; shift ;;
        --keep-fa2) keep_fa2=1; shift ;;
        --keep-moe) keep_moe=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
work=${VLLM_BUNDLE_WORK:-/tmp/vllm-bundle}
part_mib=${PART_MIB:-56}
py=${PYTHON:-python3}

# Pinned: the versions that resolved with vllm 0.26.0 (see the header).
deps=(
    annotated-types==0.8.0
    apache-tvm-ffi==0.1.10
    cachetools==8.0.3
    cbor2==6.3.0
    fastapi==0.136.3
    httpx2==2.17.0
    jmespath==1.1.0
    llguidance==1.7.6
    model-hosting-container-standards==0.1.16
    msgspec==0.23.0
    openai==3.63.0
    openai-harmony==0.0.8
    partial-json-parser==0.2.1.1.post7
    prometheus-fastapi-instrumentator==8.1.0
    pybase64==1.5.1
    pydantic==2.14.4
    pydantic_core==2.50.5
    pyzmq==27.3.0
    sniffio==1.3.1
    starlette==1.10.0
    typing-inspection==0.4.5
    typing_extensions==4.16.0
    uvicorn==0.55.0
    watchfiles==1.3.0
    xgrammar==0.2.7
)

download() {
    "$py" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$1" "${@:2}"
}

# Imported by the API server only once it builds its app (after the engine started).
extras=(prometheus-fastapi-instrumentator==8.1.0)
if [ "$extras_only" = 1 ]; then
    rm -rf "$out/.vllm-parts-extra"
    mkdir -p "$out/.vllm-parts-extra"
    download "$out/.vllm-parts-extra" "${extras[@]}"
    ls -l "$out/.vllm-parts-extra"
    exit 0
fi

mkdir -p "$work/wheels"
if [ -n "${VLLM_WHEEL:-}" ]; then
    cp -n "$VLLM_WHEEL" "$work/wheels/"
elif [ -f /tmp/vw/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl ]; then
    cp -n /tmp/vw/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl "$work/wheels/"
fi
ls "$work"/wheels/vllm-0.26.0-*.whl >/dev/null 2>&1 || download "$work/wheels" vllm==0.26.0
for d in "${deps[@]}"; do
    download "$work/wheels" "$d"
done

site=$work/site
rm -rf "$site"
mkdir -p "$site"
for w in "$work"/wheels/*.whl; do
    # Unzipping a pure or abi3/cp312 wheel is what pip --target does.
    unzip -q -o "$w" -d "$site"
done

rm -rf "$site/vllm/vllm-rs" \
    "$site/vllm/third_party/deep_gemm" \
    "$site/vllm/third_party/fmha_sm100"
[ "$keep_fa2" = 1 ] || rm -f "$site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
[ "$keep_moe" = 1 ] || rm -f "$site/vllm/_moe_C_stable_libtorch.abi3.so"
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +

# The SmolLM2 tokenizer (49,152 ids) that vllm_side_by_side.py puts beside the random
# models' config.json, from Strata's converted copy of the embedded GGUF model.
cache=${STRATA_CACHE_DIR:-$HOME/.cache/strata}
tok=$(ls -d "$cache"/gguf/SmolLM2*/ 2>/dev/null | head -1 || true)
if [ -n "$tok" ] && [ -f "$tok/tokenizer.json" ]; then
    mkdir -p "$site/smollm2-tokenizer"
    cp "$tok/tokenizer.json" "$tok/tokenizer_config.json" "$site/smollm2-tokenizer/"
else
    echo "no SmolLM2 tokenizer in $cache/gguf: vLLM will run with skip_tokenizer_init" >&2
fi
du -sh "$site"

archive=$work/vllm-site.tar.xz
tar -C "$site" -cf - . | xz -9 -T2 > "$archive"
sha=$(sha256sum "$archive" | cut -d' ' -f1)
size=$(stat -c %s "$archive")

rm -rf "$work/split"
mkdir -p "$work/split"
split -b "${part_mib}M" -d -a 2 "$archive" "$work/split/vllm-site.tar.xz.part"
parts=("$work"/split/vllm-site.tar.xz.part*)
n=${#parts[@]}

rm -rf "$out"/.vllm-parts[0-9]*
i=0
for p in "${parts[@]}"; do
    i=$((i + 1))
    dir=$out/.vllm-parts$i
    mkdir -p "$dir"
    mv "$p" "$dir/"
    printf 'parts=%s\nsha256=%s\nbytes=%s\nversion=0.26.0\n' \
        "$n" "$sha" "$size" > "$dir/manifest.txt"
done
echo "archive: $archive ($size bytes, sha256 $sha)"
du -b "$out"/.vllm-parts*/* | awk '{printf "%10.1f MiB  %s\n", $1/1048576, $2}'
du -sh "$out"/.vllm-parts*
