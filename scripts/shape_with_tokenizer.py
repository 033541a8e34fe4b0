"""Write a preset's config.json with the embedded model's tokenizer beside it, so that
`--model random:DIR/config.json` serves text on a machine without the embedded model
(the GPU soak, scripts/gpu_soak.sh, reads .gl_tok/ made by this script).

    PYTHONPATH=. python3 scripts/shape_with_tokenizer.py .gl_tok [--preset llama-3.2-1b]

The tokenizer knows 49,152 ids; a shape with a larger vocabulary (the 1B shape has
128,256) still runs, and ids the tokenizer does not know decode to nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from strata.models.embedded import embedded_model_path
from strata.models.loader import gguf_to_folder
from strata.models.presets import PRESETS


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("folder", type=Path, help="where to write (made if missing)")
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    args = p.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_to_folder(embedded_model_path()))
    tokenizer.save_pretrained(args.folder)
    (args.folder / "config.json").write_text(json.dumps(PRESETS[args.preset]))
    print(f"wrote {args.folder}: {args.preset} config.json and a tokenizer of {len(tokenizer)}")


if __name__ == "__main__":
    main()
