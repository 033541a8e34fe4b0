"""Two GPU checks behind the numbers of `strata bench tiers` (issue 4).

race        A prompt is prefilled in chunks; after the write-through has finished, each
            full block in the CPU tier is compared with the same block in the GPU pool.
            Then the prompt is asked again with a cold GPU cache (loaded from the CPU
            tier) and its greedy tokens are compared with the first answer. Done as the
            engine runs, then with every `TierManager.store` given a CUDA event recorded
            on the compute stream as `after` (patched here, on this engine object only).
contention  TTFT of a GPU prefix hit asked right after a 16k prefill, while its
            write-through drains, against the same question after `flush()`; with a cpu
            tier alone and with cpu + disk.

python benchmarks/gpu_tiers_check.py --model random:CONFIG.json [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
from typing import Any

import torch

from strata import LLM
from strata.bench.tiers_measure import ask, cold_gpu, flush
from strata.kv.tiers.manager import TierManager

LENGTH = 16384
VOCAB = 100000


def prompt_of(seed: int, n: int | None = None) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(min(1000, VOCAB // 4), VOCAB) for _ in range(n or LENGTH)]


def order_stores_after_compute(tiers: TierManager) -> None:
    """Give every store the event the scheduler does not pass: the step's compute done."""
    store = tiers.store

    def store_after(blocks: Any, block_ids: Any, after: Any = None) -> None:
        event = torch.cuda.Event() if torch.cuda.is_available() else None
        if event is not None:
            event.record()
        store(blocks, block_ids, after if after is not None else event)

    tiers.store = store_after  # type: ignore[method-assign]


def compare_blocks(llm: LLM, prompt: list[int]) -> dict[str, Any]:
    """Full blocks of `prompt` whose CPU-tier copy differs from the GPU pool's block."""
    kv, tiers = llm.engine.kv, llm.engine.tiers
    assert tiers is not None
    flush(llm)
    match = kv.match_prefix(prompt)
    refs = kv.block_refs(prompt, 0, kv.root)[: len(match.block_ids)]
    bad = []
    for i, (ref, block_id) in enumerate(zip(refs, match.block_ids, strict=True)):
        slot = tiers.cpu.slot_of(ref.key)
        assert slot is not None, f"block {i} not in the cpu tier"
        t = tiers.transfer
        stored = t.slab[slot].view(t.kv.k.dtype).view(t.block_shape).to(llm.engine.device)
        k, v = llm.engine.kv_cache.k[:, block_id], llm.engine.kv_cache.v[:, block_id]
        if not (torch.equal(stored[:, 0], k) and torch.equal(stored[:, 1], v)):
            bad.append(i)
    per_chunk = llm.engine.config.scheduler.max_num_batched_tokens // kv.block_size
    return {"blocks": len(refs), "differ": len(bad), "first": bad[:8],
            "chunks_with_bad_blocks": sorted({i // per_chunk for i in bad})}  # fmt: skip


def race(llm: LLM, seed: int) -> dict[str, Any]:
    prompt = prompt_of(seed)
    first = ask(llm, prompt, 4)
    blocks = compare_blocks(llm, prompt)
    cold_gpu(llm)
    again = ask(llm, prompt, 4)
    return {**blocks, "loaded_tokens": again.cached_tokens,
            "same_answer": again.token_ids == first.token_ids}  # fmt: skip


def contention(llm: LLM, seed: int, repeats: int = 2) -> dict[str, Any]:
    during, after = [], []
    for r in range(repeats):
        doc = prompt_of(seed + r)
        cold_gpu(llm)
        ask(llm, [*doc, 11, 12, 13], 4)  # prefill: its blocks are written through from now
        during.append(ask(llm, [*doc, 14, 15, 16], 4).ttft_s * 1e3)
        flush(llm)
        after.append(ask(llm, [*doc, 17, 18, 19], 4).ttft_s * 1e3)
    return {"gpu_hit_ttft_ms_during_write_through": during, "gpu_hit_ttft_ms_after_flush": after}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    global LENGTH, VOCAB
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="random:PRESET or random:CONFIG.json")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--length", type=int, default=LENGTH, help=f"prompt tokens (default {LENGTH})")
    p.add_argument("--kv-cpu-memory", type=float, default=6.0, help="cpu tier GiB (default 6)")
    args = p.parse_args()
    LENGTH = args.length
    kw: dict[str, Any] = {"model": args.model, "max_model_len": LENGTH + 64, "max_num_seqs": 2,
                          "num_kv_blocks": 2 * (LENGTH // 16) + 64,
                          "kv_cpu_memory": args.kv_cpu_memory}  # fmt: skip
    out: dict[str, Any] = {}
    llm = LLM(**kw)
    VOCAB = llm.engine.model_config.vocab_size
    ask(llm, prompt_of(99, min(2048, LENGTH)), 4)  # warm-up
    out["race_as_is"] = race(llm, 1)
    assert llm.engine.tiers is not None
    order_stores_after_compute(llm.engine.tiers)
    out["race_with_after_event"] = race(llm, 2)
    llm.close()
    del llm
    free_memory()
    llm = LLM(**kw)
    out["contention_cpu"] = contention(llm, 10)
    llm.close()
    del llm
    free_memory()
    with tempfile.TemporaryDirectory() as disk:
        llm = LLM(**kw, kv_disk_dir=disk)
        out["contention_cpu_disk"] = contention(llm, 20)
        llm.close()
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
