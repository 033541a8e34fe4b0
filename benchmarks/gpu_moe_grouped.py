"""GPU check and timing of the grouped expert kernel (strata/ops/triton_grouped_experts.py)
against the per-expert torch loop, on one MoE layer of the OLMoE-1B-7B shape (64 experts,
H 2048, F 1024, top-8, bf16, random weights and routing, stacked = ResidentExperts).

Error: ||out - ref|| / ||ref|| against a float64 reference of the same bf16 inputs;
every row is poisoned (NaN) before the run and checked written. Time: host wall clock of
one layer's call (launches included: that is the cost being removed), median of 30 after
warm-up, inputs rotated over 4 routings. GB/s = bytes of the used experts / time.

python benchmarks/gpu_moe_grouped.py
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from strata.models.routed_experts import group_by_expert
from strata.ops.grouped_experts import ExpertRows, run_experts

E, H, F, K = 64, 2048, 1024, 8


def layer_inputs(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, list[ExpertRows], int]:
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])
    order, counts = group_by_expert(ids, E)
    x = torch.randn(tokens, H, generator=gen).to("cuda", torch.bfloat16)
    rows_in = x[order.cuda() // K].contiguous()
    return rows_in, counts, sum(1 for c in counts if c)


def experts_of(counts: list[int], gate_up: torch.Tensor, down: torch.Tensor) -> list[ExpertRows]:
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append(ExpertRows(start, n, gate_up[e], down[e]))
            start += n
    return out


def run(rows_in: torch.Tensor, experts: list[ExpertRows], grouped: bool) -> torch.Tensor:
    os.environ["STRATA_MOE_GROUPED"] = "1" if grouped else "0"
    out = torch.full_like(rows_in, float("nan"))
    run_experts(rows_in, out, experts)
    return out


def reference(rows_in: torch.Tensor, experts: list[ExpertRows]) -> torch.Tensor:
    out = torch.empty(rows_in.shape, dtype=torch.float64, device=rows_in.device)
    for ex in experts:
        x = rows_in[ex.start : ex.start + ex.count].double()
        gu = x @ ex.gate_up.double().T
        h = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
        out[ex.start : ex.start + ex.count] = h @ ex.down.double().T
    return out


def wall_ms(fn: Callable[[int], object], reps: int = 30) -> float:
    times = []
    for i in range(reps + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * F, H, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    down = (torch.randn(E, H, F, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    expert_bytes = 3 * F * H * 2
    print(f"{torch.cuda.get_device_name()}, OLMoE layer shape E={E} H={H} F={F} top-{K}, bf16")
    print("| tokens | experts used | err kernel | err loop | loop ms | kernel ms | x | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in (1, 4, 16, 64, 256):
        sets = []
        for _ in range(4):
            rows_in, counts, used = layer_inputs(tokens, gen)
            sets.append((rows_in, experts_of(counts, gate_up, down), used))
        rows_in, experts, used = sets[0]
        ref = reference(rows_in, experts)
        errs = []
        for grouped in (True, False):
            out = run(rows_in, experts, grouped)
            assert not out.isnan().any(), "unwritten rows"
            errs.append(((out.double() - ref).norm() / ref.norm()).item())
        ms = [wall_ms(lambda i, g=g, s=sets: run(*s[i % 4][:2], g)) for g in (False, True)]
        gbs = sum(s[2] for s in sets) / len(sets) * expert_bytes / (ms[1] * 1e-3) / 1e9
        print(
            f"| {tokens} | {used} | {errs[0]:.1e} | {errs[1]:.1e} | {ms[0]:.3f} | {ms[1]:.3f} "
            f"| {ms[0] / ms[1]:.1f}x | {gbs:.0f} |"
        )
    os.environ.pop("STRATA_MOE_GROUPED")


if __name__ == "__main__":
    main()
