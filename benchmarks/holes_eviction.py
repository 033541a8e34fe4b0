"""Reuse around holes and the GPU pool's eviction order, on a pool capped so it evicts.

Four engines on the same workloads (`strata bench tiers` shapes, tiers off):
    lru, no holes   reuse stops at the first evicted block (before issue 18)
    lru + holes     blocks after an evicted one are reused; only the hole is computed
    cost, no holes  --kv-eviction cost: free cached blocks leave by hit likelihood x
                    recompute cost (strata/kv/pool_order.py), without reuse past holes
    cost + holes    both

With `--tiers`, three engines with a cpu tier capped at `--tier-mib` (so that it evicts
too), reuse around holes on, and a block the pool lacks loaded from the tier in its place:
    pool lru, tier lru     --kv-eviction lru, --kv-tier-eviction lru
    pool cost, tier lru    --kv-eviction cost, --kv-tier-eviction lru
    pool cost, tier cost   both cost: the tier weighs each block's position in its prefix

Workloads: shared-document QA (every document asked each question once, in a seeded
random order, one request at a time) and multi-round chat (users' growing conversations,
round robin, `--chat-concurrency` turns in flight). Printed per engine and workload: TTFT
mean and p99, prompt tokens served from the cache, query tokens computed, wall time, and
answers that differ from the first engine's (greedy: 0 expected); with tiers also the
prompt tokens loaded from the tier.

    python benchmarks/holes_eviction.py --model random:smollm2-135m --device cpu [--tiers]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import torch

from strata.bench.tiers_chat import run_chat
from strata.bench.tiers_measure import ask, device_name
from strata.bench.tiers_workloads import chat_workload, documents
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams

ENGINES: dict[str, dict[str, Any]] = {
    "lru, no holes": {"kv_eviction": "lru", "kv_reuse_holes": False},
    "lru + holes": {"kv_eviction": "lru", "kv_reuse_holes": True},
    "cost, no holes": {"kv_eviction": "cost", "kv_reuse_holes": False},
    "cost + holes": {"kv_eviction": "cost", "kv_reuse_holes": True},
}
TIER_ENGINES: dict[str, dict[str, Any]] = {
    "pool lru, tier lru": {"kv_eviction": "lru", "kv_tier_eviction": "lru"},
    "pool cost, tier lru": {"kv_eviction": "cost", "kv_tier_eviction": "lru"},
    "pool cost, tier cost": {"kv_eviction": "cost", "kv_tier_eviction": "cost"},
}


def engines(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if not args.tiers:
        return ENGINES
    tier = {"kv_reuse_holes": True, "kv_cpu_memory": args.tier_mib / 1024}
    return {name: {**keywords, **tier} for name, keywords in TIER_ENGINES.items()}


@dataclass(frozen=True)
class Row:
    engine: str
    workload: str
    ttft_ms: list[float]
    hit_tokens: int
    computed_tokens: int
    wall_s: float
    answers: list[list[int]]
    tier_hit_tokens: int = 0  # prompt tokens loaded from a tier (not in hit_tokens)

    def summary(self, reference: Row | None) -> dict[str, Any]:
        arr = np.asarray(self.ttft_ms)
        differ = 0 if reference is None else sum(
            a != b for a, b in zip(self.answers, reference.answers, strict=True)
        )  # fmt: skip
        return {
            "engine": self.engine, "workload": self.workload, "requests": len(arr),
            "ttft_mean_ms": float(arr.mean()), "ttft_p99_ms": float(np.percentile(arr, 99)),
            "hit_tokens": self.hit_tokens, "tier_hit_tokens": self.tier_hit_tokens,
            "computed_tokens": self.computed_tokens,
            "wall_s": self.wall_s, "answers_differ": differ,
        }  # fmt: skip


def measured(llm: LLM, engine: str, workload: str, run: Any) -> Row:
    """Run `run(llm) -> (ttft ms list, answers)`, counting cache hits and computed tokens."""
    runner = llm.engine.runner
    runner.step_log = []
    before = llm.stats()
    start = time.perf_counter()
    ttft, answers = run(llm)
    wall = time.perf_counter() - start
    computed = sum(s.tokens for s in runner.step_log)
    runner.step_log = None
    after = llm.stats()
    hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    tier = "prefix_cache_tier_hit_tokens"
    tier_hit = after.get(tier, 0) - before.get(tier, 0)
    return Row(engine, workload, ttft, hit, computed, wall, answers, tier_hit)


def qa_run(args: argparse.Namespace, vocab: int) -> Any:
    docs = documents([args.doc_len], args.docs, args.questions, args.suffix_len, vocab, args.seed)
    order = [(d, q) for d in range(len(docs)) for q in range(args.questions)]
    random.Random(args.seed).shuffle(order)

    def run(llm: LLM) -> tuple[list[float], list[list[int]]]:
        answers = [ask(llm, docs[d].question(q), args.answer_len) for d, q in order]
        return [a.ttft_s * 1e3 for a in answers], [a.token_ids for a in answers]

    return run


def chat_run(args: argparse.Namespace, vocab: int) -> Any:
    work = chat_workload(
        args.chat_users, args.chat_turns, args.chat_first_len, args.chat_message_len,
        args.answer_len, vocab, args.seed,
    )  # fmt: skip

    def run(llm: LLM) -> tuple[list[float], list[list[int]]]:
        result = run_chat(llm, work, "tiers-off", args.chat_concurrency, 0.0)
        ttft = [v for turn in result.ttft_ms for v in turn]
        return ttft, [a for user in result.answers for a in user]

    return run


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-blocks", type=int, default=120, help="GPU pool cap (blocks)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--doc-len", type=int, default=768)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--suffix-len", type=int, default=12)
    p.add_argument("--answer-len", type=int, default=8)
    p.add_argument("--chat-users", type=int, default=6)
    p.add_argument("--chat-turns", type=int, default=4)
    p.add_argument("--chat-first-len", type=int, default=384)
    p.add_argument("--chat-message-len", type=int, default=48)
    p.add_argument("--chat-concurrency", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs of each engine, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--tiers", action="store_true", help="the tier engines (module docstring)")
    p.add_argument("--tier-mib", type=float, default=48.0, help="cpu tier cap with --tiers")
    p.add_argument("--output", help="write the rows as JSON here")
    return p.parse_args()


def fresh_engine(args: argparse.Namespace, keywords: dict[str, Any]) -> LLM:
    """An engine warmed up on one request, its GPU pool then emptied of cached blocks."""
    llm = LLM(
        args.model, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.pool_blocks, max_model_len=args.max_model_len,
        max_num_seqs=args.chat_concurrency, seed=args.seed, **keywords,
    )  # fmt: skip
    llm.generate([list(range(10, 10 + 4 * args.block_size))], SamplingParams(max_tokens=2))
    llm.engine.kv.evict_all_cached()
    return llm


def pooled(rows: list[Row]) -> Row:
    """Repeats of one engine and workload: TTFTs pooled, the median wall time. Cache hits,
    computed tokens and answers do not depend on timing: they must agree."""
    first = rows[0]
    for row in rows[1:]:
        same = (row.hit_tokens, row.tier_hit_tokens, row.computed_tokens, row.answers)
        if same != (first.hit_tokens, first.tier_hit_tokens, first.computed_tokens,
                    first.answers):  # fmt: skip
            raise RuntimeError(f"{first.engine} {first.workload}: repeats disagree")
    ttft = [v for row in rows for v in row.ttft_ms]
    wall = float(np.median([row.wall_s for row in rows]))
    return Row(first.engine, first.workload, ttft, first.hit_tokens, first.computed_tokens,
               wall, first.answers, first.tier_hit_tokens)  # fmt: skip


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)  # steadier timings on a shared machine
    rows: list[dict[str, Any]] = []
    chosen = engines(args)
    for workload in ("qa", "chat"):
        runs: dict[str, list[Row]] = {name: [] for name in chosen}
        for _ in range(args.repeats):  # engines alternate, so drift in the machine's load
            for engine, keywords in chosen.items():  # spreads over all of them
                llm = fresh_engine(args, keywords)
                vocab = llm.engine.model_config.vocab_size
                make = qa_run if workload == "qa" else chat_run
                runs[engine].append(measured(llm, engine, workload, make(args, vocab)))
                llm.check_integrity()
                llm.close()
        reference = pooled(runs[next(iter(chosen))])
        for engine in chosen:
            rows.append(pooled(runs[engine]).summary(reference))
            print(json.dumps(rows[-1]), flush=True)
    print_table(args, rows)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    device = device_name(torch.device(args.device))
    print(f"\n{date.today()}  {device}  {platform.node()}  model {args.model}, "
          f"{args.repeats} runs of each engine (TTFTs pooled, median wall time)")  # fmt: skip
    print(f"block {args.block_size}, pool {args.pool_blocks} blocks; QA {args.docs} docs x "
          f"{args.doc_len} tokens x {args.questions} questions; chat {args.chat_users} users "
          f"x {args.chat_turns} turns (first {args.chat_first_len}, messages "
          f"{args.chat_message_len}, answers {args.answer_len})"
          + (f"; cpu tier {args.tier_mib:g} MiB" if args.tiers else ""))  # fmt: skip
    print("| workload | engine | TTFT mean ms | TTFT p99 ms | hit tokens | tier hit tokens "
          "| computed tokens | wall s | answers differ |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['engine']} | {r['ttft_mean_ms']:.1f} | "
              f"{r['ttft_p99_ms']:.1f} | {r['hit_tokens']} | {r['tier_hit_tokens']} | "
              f"{r['computed_tokens']} | {r['wall_s']:.2f} | {r['answers_differ']} |")  # fmt: skip


if __name__ == "__main__":
    main()
