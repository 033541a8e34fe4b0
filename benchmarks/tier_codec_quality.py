"""Tier codecs (--kv-tier-codec) on the embedded model, on CPU: bytes per stored block,
the KV error of a round trip through the tier, and greedy agreement of tier-loaded
prefixes with recomputed ones.

    python3 benchmarks/tier_codec_quality.py [--prompts 4 --words 500 --max-tokens 32]

1. Bytes per block of each codec for SmolLM2-135M and Llama-3-8B shapes (16 tokens),
   against the exact block in float32 and bfloat16.
2. Round trip: every full block the prompts left in the pool goes pool -> tier slot ->
   pool through the tier's BlockTransfer under each codec; max and mean |error| of K
   and V, and the max relative to the largest |value| of the block's layer; store
   (encode + copy) and load (copy + decode) rates in GB/s of exact KV, best of 3.
3. Agreement: each prompt (a Shakespeare excerpt + a question) is answered with its
   prefix recomputed (no tier), and with its full blocks loaded from the cpu tier under
   each codec (prefilled once, GPU cache emptied, asked again). Greedy tokens equal to
   the recomputed answer before the first difference, and in all.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from strata import LLM, SamplingParams
from strata.eval.corpus import essay_words
from strata.kv.cache import KVCache
from strata.kv.codec import get_codec
from strata.kv.tiers.base import BlockLayout
from strata.kv.tiers.transfer import BlockTransfer

CODECS = ["none", "fp8", "int8", "int4"]
SHAPES = {"SmolLM2-135M": (30, 3, 64), "Llama-3-8B": (32, 8, 128)}


def bytes_table() -> None:
    print("| model shape | codec | bytes/block | vs float32 | vs bfloat16 |")
    print("|---|---|---|---|---|")
    for name, (layers, heads, dim) in SHAPES.items():
        raw = {d: BlockLayout("0" * 64, layers, heads, dim, 16, d).nbytes
               for d in ("float32", "bfloat16")}  # fmt: skip
        sizes = {f"none ({d})": n for d, n in raw.items()}
        for codec in CODECS[1:]:  # coded sizes do not depend on the model dtype
            layout = get_codec(codec).layout_name
            sizes[codec] = BlockLayout("0" * 64, layers, heads, dim, 16, "bfloat16", layout).nbytes
        for codec, n in sizes.items():
            print(f"| {name} ({layers}x{heads}x{dim}) | {codec} | {n:,} | "
                  f"{raw['float32'] / n:.2f}x | {raw['bfloat16'] / n:.2f}x |")  # fmt: skip


def prompts(n: int, words: int, seed: int = 0) -> list[list[dict[str, str]]]:
    stream = essay_words()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(len(stream) - words)
        text = " ".join(stream[start : start + words])
        question = "Who speaks first in the passage above, and what do they want?"
        out.append([{"role": "user", "content": f"{text}\n\n{question}"}])
    return out


def cached_blocks(llm: LLM) -> list[int]:
    kv = llm.engine.kv
    return [b for b in kv.pool.free_order() if kv.index.key_of(b) is not None]


def round_trip_errors(kv: KVCache, ids: list[int], codec: str) -> dict[str, float]:
    """Pool blocks `ids` through tier slots and back into a scratch pool: K and V error."""
    shape = SimpleNamespace(num_layers=kv.num_layers, num_kv_heads=kv.shape.num_kv_heads,
                            head_dim=kv.shape.head_dim)  # fmt: skip
    scratch = KVCache(shape, len(ids), kv.block_size, kv.dtype, kv.device)  # type: ignore[arg-type]
    index = torch.tensor(ids)
    k, v = kv.k.index_select(1, index), kv.v.index_select(1, index)
    scratch.k.copy_(k)
    scratch.v.copy_(v)
    layout_codec = None if codec == "none" else get_codec(codec)
    probe = BlockLayout("0" * 64, kv.num_layers, kv.shape.num_kv_heads, kv.shape.head_dim,
                        kv.block_size, str(kv.dtype).removeprefix("torch."),
                        "raw" if layout_codec is None else layout_codec.layout_name)  # fmt: skip
    slab = torch.empty((len(ids), probe.nbytes), dtype=torch.uint8)
    transfer = BlockTransfer(scratch, slab, layout_codec)
    slots = list(range(len(ids)))
    exact = len(ids) * kv.block_bytes
    store = _best_seconds(lambda: transfer.store(slots, slots, None))
    scratch.k.zero_()
    scratch.v.zero_()
    load = _best_seconds(lambda: transfer.load(slots, slots))
    out: dict[str, float] = {"bytes/block": probe.nbytes, "store GB/s": exact / store / 1e9,
                             "load GB/s": exact / load / 1e9}  # fmt: skip
    for name, x, dx in (("K", k, scratch.k), ("V", v, scratch.v)):
        err = (dx - x).abs()
        scale = x.abs().amax(dim=(1, 2, 3, 4), keepdim=True)  # per layer
        out[f"{name} max"] = float(err.max())
        out[f"{name} mean"] = float(err.mean())
        out[f"{name} max/layer max"] = float((err / scale).max())
        out[f"{name} mean |x|"] = float(x.abs().mean())
    return out


def _best_seconds(fn: Callable[[], None], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def answers(llm: LLM, chats: list[Any], params: SamplingParams, from_tier: bool) -> list[list[int]]:
    """Greedy answers; from_tier: prefill once, empty the GPU cache, answer from the tier."""
    if from_tier:
        llm.chat(chats, SamplingParams(max_tokens=1, temperature=0))
        assert llm.engine.tiers is not None
        llm.engine.tiers.flush()
        llm.engine.kv.evict_all_cached()
    before = llm.stats()["prefix_cache_tier_hit_tokens"]
    outs = llm.chat(chats, params)
    if from_tier:
        assert llm.stats()["prefix_cache_tier_hit_tokens"] > before, "nothing came from the tier"
    else:
        print(f"\nprompt tokens: {[len(o.prompt_token_ids) for o in outs]}")
    return [o.token_ids for o in outs]


def agreement(ref: list[list[int]], got: list[list[int]]) -> str:
    cells = []
    for a, b in zip(ref, got, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        same = sum(x == y for x, y in zip(a, b, strict=True))
        cells.append(f"{first}/{same}/{len(a)}")
    return " ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--words", type=int, default=500, help="Shakespeare words per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    bytes_table()
    chats = prompts(args.prompts, args.words)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    kw: dict[str, Any] = {"device": "cpu", "kv_cache_memory": 0.5, "max_model_len": 2048}
    ref_llm = LLM(**kw)
    ref = answers(ref_llm, chats, params, from_tier=False)
    ids = cached_blocks(ref_llm)
    print(f"\n{len(chats)} prompts, {len(ids)} cached blocks "
          f"({ref_llm.engine.kv_cache.dtype}); errors over every element of them\n")  # fmt: skip
    rows = {c: round_trip_errors(ref_llm.engine.kv_cache, ids, c) for c in CODECS}
    cols = list(rows["fp8"])
    print("| codec | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for codec, row in rows.items():
        print(f"| {codec} | " + " | ".join(f"{row[c]:.4g}" if row[c] < 1e5 else f"{row[c]:,.0f}"
                                         for c in cols) + " |")  # fmt: skip
    print("\nGreedy tokens, tier-loaded vs recomputed (per prompt: equal before the first "
          "difference / equal in all / generated)\n")  # fmt: skip
    for codec in CODECS:
        llm = LLM(kv_cpu_memory=0.5, kv_tier_codec=codec, **kw)
        got = answers(llm, chats, params, from_tier=True)
        hits = llm.stats()["prefix_cache_tier_hit_tokens"]
        print(f"| {codec} | {agreement(ref, got)} | tier hit tokens {hits} |")
        llm.close()


if __name__ == "__main__":
    main()
