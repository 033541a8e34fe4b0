"""Mixed precision on miss: logit error against full precision (the embedded model is
dense, so the quality harness cannot run on it; this measures a random-weight MoE shape).

Each configuration decodes the same prompts greedily through expert offloading with a
small cache (so most uses are misses) and records every step's logits; the reference is
the same run with miss precision "full". Reported: the max absolute logit difference, the
relative L2 error, greedy-token agreement, and the share of misses loaded low.

    python -m strata.bench.moe_quality --model olmoe-1b-7b:2
"""

from __future__ import annotations

import argparse
import random

import torch

from strata.bench.moe import shape_spec
from strata.config import CacheConfig, EngineConfig, MoEConfig, SchedulerConfig
from strata.engine.engine import LLMEngine
from strata.engine.overlap import SampledStep
from strata.engine.plan import StepPlan
from strata.engine.sampling_params import SamplingParams


def run(spec: str, moe: MoEConfig, prompts: list[list[int]], tokens: int):
    engine = LLMEngine(EngineConfig(
        model=spec, device="cpu", dtype="float32", moe=moe,
        cache=CacheConfig(num_blocks=128, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_model_len=256),
    ))  # fmt: skip
    seen: list[torch.Tensor] = []
    compute = engine.runner.compute_logits

    def recording(plan: StepPlan, feed: SampledStep | None = None) -> torch.Tensor | None:
        logits = compute(plan, feed)
        if logits is not None:
            seen.append(logits.clone())
        return logits

    engine.runner.compute_logits = recording  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return torch.cat(seen), [done[i] for i in ids], engine.stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="olmoe-1b-7b:2", metavar="PRESET[:LAYERS]")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 1.0])
    args = p.parse_args()
    preset, _, layers = args.model.partition(":")
    spec = shape_spec(preset, int(layers) if layers else None, 256)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 30000) for _ in range(24)] for _ in range(4)]
    base = MoEConfig(expert_slots=args.slots, prefetch=False, cpu_compute="off",
                     rebalance_interval=0)  # fmt: skip
    ref_logits, ref_tokens, _ = run(spec, base, prompts, args.tokens)
    print(f"{args.model}, float32 on CPU, {args.slots} expert slots, 4 prompts x 24 tokens, "
          f"{args.tokens} greedy tokens")  # fmt: skip
    print("| miss precision | threshold | low / all misses | max abs logit diff "
          "| relative L2 error | greedy tokens equal |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for precision in ("int8", "int4"):
        for threshold in args.thresholds:
            moe = MoEConfig(expert_slots=args.slots, prefetch=False, cpu_compute="off",
                            rebalance_interval=0, miss_precision=precision,
                            low_precision_threshold=threshold)  # fmt: skip
            logits, tokens, stats = run(spec, moe, prompts, args.tokens)
            n = min(len(logits), len(ref_logits))
            diff = (logits[:n] - ref_logits[:n]).abs().max().item()
            rel = ((logits[:n] - ref_logits[:n]).norm() / ref_logits[:n].norm()).item()
            same = sum(
                x == y for a, b in zip(tokens, ref_tokens, strict=True)
                for x, y in zip(a, b, strict=True)
            )  # fmt: skip
            print(f"| {precision} | {threshold} | {stats['moe_expert_low_precision_loads']} / "
                  f"{stats['moe_expert_misses']} | {diff:.2e} | {rel:.2e} "
                  f"| {same}/{sum(map(len, ref_tokens))} |")  # fmt: skip


if __name__ == "__main__":
    main()
