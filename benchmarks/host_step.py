"""The engine's host work per decode step at a large batch, with a model too small to matter.

    python benchmarks/host_step.py [--batch 256] [--output-len 64] [--profile]

A random Llama of one layer, 64 hidden units and 2,048 ids on the CPU runs `batch` requests
of 24-token id prompts, greedy, `output_len` tokens each. Prints the median time of the
decode steps (the first two and last two steps left out), which is mostly the engine's
Python: scheduling, slot mappings, sampling batches, finishing and outputs. `--profile`
adds the host profile of every step.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from strata import LLM, SamplingParams
from strata.models.embedded import embedded_model_path
from strata.models.loader import gguf_to_folder

CONFIG = {
    "model_type": "llama", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="requests decoding together (256)")
    p.add_argument("--output-len", type=int, default=64, help="tokens per request (64)")
    p.add_argument("--profile", action="store_true", help="print the host profile")
    p.add_argument(
        "--final-only", action="store_true",
        help="requests as offline generate makes them: no output until finished",
    )  # fmt: skip
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(CONFIG))
        for name in ("tokenizer.json", "tokenizer_config.json"):  # random: takes it from here
            source = gguf_to_folder(embedded_model_path()) / name
            (Path(folder) / name).write_bytes(source.read_bytes())
        llm = LLM(f"random:{folder}/config.json", device="cpu", max_num_seqs=args.batch)
    prompts = [[(7 * i + j) % 2000 + 10 for j in range(24)] for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:8], params)  # warm-up
    engine = llm.engine
    for prompt in prompts:
        seq = engine.prepare(prompt, params)
        seq.final_only = args.final_only
        engine.enqueue(seq)
    profiler = cProfile.Profile() if args.profile else None
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        engine.step()
        if profiler is not None:
            profiler.disable()
        steps.append(time.perf_counter() - start)
    decode = statistics.median(steps[2:-2])
    print(f"{len(steps)} steps; decode step median {decode * 1e3:.2f} ms at batch {args.batch}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
