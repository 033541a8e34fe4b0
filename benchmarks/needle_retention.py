"""Which tokens does each KV policy keep? Needle retention on RULER's niah samples.

For every niah sample, the positions a policy keeps at its compression point (per layer
and KV head) are recorded and compared with three spans of the prompt:

    needle   the tokens of the needle's value (the 7 digits the answer must contain):
             the fraction of (layer, KV head, token) triples kept, and the fraction of
             (layer, KV head) pairs that keep every one of its tokens
    question the question's tokens (query-aware only: query-agnostic compresses before it)
    recent   the last 10% of the compressed span

A policy can only answer from what it keeps, so "needle kept" (the fraction of
(layer, KV head, needle token) triples kept) explains its niah scores: a value kept in
few layers is not recalled. Runs through the real engine; nothing is simulated.

    python benchmarks/needle_retention.py --model MODEL --length 4096 --samples 5 \
        --policy streaming,h2o,snapkv,tova,expected_attention --budget 0.125
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import strata.kv.policies.runtime.driver as driver
from strata.engine.llm import LLM
from strata.eval.niah import NIAH_SPECS
from strata.eval.prompt import prompt_ids, template_parts
from strata.eval.sample import Sample
from strata.eval.settings import Setting
from strata.eval.strata_runner import run_samples
from strata.eval.tasks import generate_samples
from strata.kv.policies.base import AttentionShape, KVPolicy, KVView

CREATED: list[KVPolicy] = []  # every policy created, in order: one per request queued
KEPT: dict[int, list[torch.Tensor]] = {}  # id(policy) -> per layer [kv_heads, k] positions


def _recording(create: Any) -> Any:
    """Wrap create_policy so each policy's first selection (the compression point) is
    recorded as the positions it keeps."""

    def create_policy(name: str, shape: AttentionShape) -> KVPolicy:
        policy = create(name, shape)
        CREATED.append(policy)
        select = policy.select

        def recorded(view: KVView, keep: list[int]) -> list[torch.Tensor]:
            masks = select(view, keep)
            if id(policy) not in KEPT:
                KEPT[id(policy)] = [
                    view.positions(layer)[mask].view(mask.shape[0], -1).cpu()
                    for layer, mask in enumerate(masks)
                ]
            return masks

        policy.select = recorded  # type: ignore[method-assign]
        return policy

    return create_policy


def needle_positions(tokenizer: Any, head: str, sample: Sample) -> list[int]:
    """Token positions of the needle values within the context's ids."""
    text = head + sample.context
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    positions: set[int] = set()
    for ref in sample.references:
        at = text.find(f"is: {ref}.")
        if at < 0:
            raise ValueError(f"needle value {ref} not found in sample {sample.index}")
        first, last = at + len("is: "), at + len("is: ") + len(ref)
        positions.update(i for i, (a, b) in enumerate(enc.offset_mapping) if a < last and b > first)
    return sorted(positions)


def whole(kept: list[torch.Tensor], span: list[int]) -> float:
    """Fraction of (layer, KV head) pairs that keep every position of span."""
    wanted = torch.tensor(span)
    pairs = [bool(torch.isin(wanted, head).all()) for layer in kept for head in layer]
    return sum(pairs) / len(pairs)


def retention(kept: list[torch.Tensor], span: list[int]) -> float:
    """Fraction of (layer, KV head, position in span) triples kept."""
    if not span:
        return float("nan")
    wanted = torch.tensor(span)
    hits = sum(int(torch.isin(layer, wanted).sum()) for layer in kept)
    total = sum(layer.shape[0] for layer in kept) * len(span)
    return hits / total


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    driver.create_policy = _recording(driver.create_policy)
    llm = LLM(
        model=args.model, device=args.device, enable_prefix_caching=False,
        max_model_len=args.length, kv_cache_memory=args.kv_cache_memory,
        enforce_eager=True,
    )  # fmt: skip
    tokenizer = llm.engine.tokenizer
    parts = template_parts(tokenizer)
    samples = [
        s for task in args.tasks.split(",")
        for s in generate_samples(tokenizer, task, args.length, args.samples, args.seed)
    ]  # fmt: skip
    rows = []
    for policy in args.policy.split(","):
        for protocol in args.protocol.split(","):
            CREATED.clear()
            KEPT.clear()
            # run_samples queues the samples in order, so CREATED[i] is sample i's policy
            result = run_samples(llm, samples, Setting(policy, args.budget, protocol), False)
            if len(CREATED) != len(samples):
                raise ValueError(f"policy {policy!r} keeps everything: nothing to record")
            stats: dict[str, list[float]] = defaultdict(list)
            for sample, outcome, created in zip(samples, result.samples, CREATED, strict=True):
                kept = KEPT[id(created)]
                ids = prompt_ids(tokenizer, sample, parts)
                compressed = ids.compressible(protocol)
                question_end = min(compressed, len(ids.context) + len(ids.question))
                q_span = list(range(len(ids.context), question_end))
                recent = list(range(compressed - compressed // 10, compressed))
                needle = needle_positions(tokenizer, parts[0], sample)
                stats["needle"].append(retention(kept, needle))
                stats["whole"].append(whole(kept, needle))
                stats["question"].append(retention(kept, q_span))
                stats["recent"].append(retention(kept, recent))
                stats["score"].append(100 * outcome.score)
            row = {"policy": policy, "protocol": protocol, "budget": args.budget,
                   **{k: sum(v) / len(v) for k, v in stats.items()}}  # fmt: skip
            rows.append(row)
            print(
                f"| {policy} | {protocol} | {100 * row['needle']:.1f} | {100 * row['whole']:.1f} | "
                f"{100 * row['question']:.1f} | {100 * row['recent']:.1f} | {row['score']:.1f} |",
                flush=True,
            )
    llm.check_integrity()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="model path or GGUF (default: the embedded model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--samples", type=int, default=5, help="samples per task")
    p.add_argument("--tasks", default=",".join(NIAH_SPECS), help="comma-separated niah tasks")
    p.add_argument("--policy", default="streaming,h2o,snapkv,tova,expected_attention",
                   help="comma-separated policies")  # fmt: skip
    p.add_argument("--budget", type=float, default=0.125, help="KV budget (fraction or tokens)")
    p.add_argument("--protocol", default="query-aware,query-agnostic",
                   help="comma-separated protocols")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sample seed (the eval's --eval-seed)")
    p.add_argument("--kv-cache-memory", type=float, default=4.0, help="KV pool in GiB")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    for task in args.tasks.split(","):
        if task not in NIAH_SPECS:
            p.error(f"--tasks: {task!r} is not a niah task; valid: {', '.join(NIAH_SPECS)}")
    print(
        "| policy | protocol | needle tokens kept % | whole needle kept, % of layer-heads "
        "| question kept % | last 10% kept % | score |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
