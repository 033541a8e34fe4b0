"""GPU check of expert offloading before the benchmark: greedy tokens of a 4-layer
OLMoE-1B-7B shape (random weights, bf16) with every expert resident on the GPU against
offloading at 25% residency: cache only, + prefetch, + CPU compute of every miss, and
the budget path (--gpu-memory) with lru. Exact equality is expected whenever the GPU
computes every expert (same kernels, same shapes); CPU compute rounds differently.

python benchmarks/gpu_moe_check.py
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

from strata import LLM, SamplingParams
from strata.config import MoEConfig
from strata.models.presets import PRESETS


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dict(PRESETS["olmoe-1b-7b"], num_hidden_layers=4, max_position_embeddings=512)
    path = os.path.join(tempfile.mkdtemp(), "olmoe-4l.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    spec = f"random:{path}"
    prompts = [[(7 * i + 13 * j) % 50000 for j in range(20 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref_llm = LLM(spec, device="cuda", num_kv_blocks=256, max_model_len=512)
    ref = [o.token_ids for o in ref_llm.generate(prompts, params)]
    del ref_llm
    slots = 64  # 25% of 4 x 64
    cases = {
        "cache only": MoEConfig(expert_slots=slots, prefetch=False, cpu_compute="off"),
        "cache + prefetch": MoEConfig(expert_slots=slots, cpu_compute="off"),
        "1 slot": MoEConfig(expert_slots=1, cpu_compute="off"),
        "+ CPU compute (on)": MoEConfig(expert_slots=slots, cpu_compute="on"),
        "budget 6 GiB, lru, auto": MoEConfig(gpu_memory=6.0, policy="lru"),
    }
    print("| case | tokens equal to resident | hit rate | prefetch P/R | slots | s |")
    print("|---|---|---|---|---|---|")
    for name, moe in cases.items():
        start = time.perf_counter()
        llm = LLM(spec, device="cuda", num_kv_blocks=256, max_model_len=512, moe=moe)
        out = [o.token_ids for o in llm.generate(prompts, params)]
        llm.check_integrity()
        st = llm.stats()
        same = sum(a == b for a, b in zip(out, ref, strict=True))
        tok = sum(x == y for a, b in zip(out, ref, strict=True) for x, y in zip(a, b, strict=True))
        print(
            f"| {name} | {same}/{len(ref)} requests, {tok}/{sum(map(len, ref))} tokens "
            f"| {st['moe_expert_hit_rate']:.0%} | {st['moe_prefetch_precision']:.0%}/"
            f"{st['moe_prefetch_recall']:.0%} | {st['moe_expert_slots']} "
            f"| {time.perf_counter() - start:.1f} |"
        )
        del llm


if __name__ == "__main__":
    main()
