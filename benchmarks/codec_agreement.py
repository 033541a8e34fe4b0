"""Greedy agreement of each KV codec with full precision on the embedded model (CPU).

    python3 benchmarks/codec_agreement.py [--max-tokens 48]

For each chat prompt: how many greedy tokens each `kv_cache_dtype` reproduces before it
first differs from `auto`, and the log-probability margin between auto's top two
candidates at that step (a small margin means a near tie, not a broken codec).
"""

from __future__ import annotations

import argparse

from strata import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
]
CODECS = ["fp8", "int8", "int4", "int2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per prompt")
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, logprobs=2)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]

    def run(codec: str) -> list[list[int]]:
        llm = LLM(device="cpu", kv_cache_memory=0.2, max_model_len=1024, kv_cache_dtype=codec)
        return [out.token_ids for out in llm.chat(chats, params)]

    full = LLM(device="cpu", kv_cache_memory=0.2, max_model_len=1024).chat(chats, params)
    print(f"{'codec':<6} " + " ".join(f"p{i}:same/len(margin)" for i in range(len(PROMPTS))))
    for codec in CODECS:
        cells = []
        for ref, ids in zip(full, run(codec), strict=True):
            pairs = zip(ref.token_ids, ids, strict=False)
            same = next((i for i, (a, b) in enumerate(pairs) if a != b),
                        min(len(ref.token_ids), len(ids)))  # fmt: skip
            margin = ""
            if same < len(ref.token_ids) and ref.logprobs:
                top = ref.logprobs[same].top
                margin = f"({top[0][1] - top[1][1]:.3f})"
            cells.append(f"{same}/{len(ref.token_ids)}{margin}")
        print(f"{codec:<6} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
