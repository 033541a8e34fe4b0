"""All experts of one layer on rows sorted by expert: one grouped kernel pair on CUDA,
a per-expert torch loop elsewhere.

    rows_in [N, H] sorted by expert; expert j of `experts` owns rows
    [start_j, start_j + count_j) and its weights are (gate_up_j [2F, H], down_j [H, F])

The Triton path (triton_grouped_experts.py) needs every gate_up view in one allocation, every
down view in one allocation (the arena's slots, or a layer's stacked experts), contiguous,
in fp16/bf16 on CUDA; anything else takes the torch loop. STRATA_MOE_GROUPED=0 forces the
loop (to compare the two; both compute the same function, rounding aside).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from strata.ops.activation import silu_and_mul

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ExpertRows:
    """One expert's rows [start, start + count) and its weights."""

    start: int
    count: int
    gate_up: torch.Tensor  # [2F, H]
    down: torch.Tensor  # [H, F]


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on the rows of x: down(silu(gate(x)) * up(x)); [n, H] -> [n, H]."""
    return F.linear(silu_and_mul(F.linear(x, gate_up), fused=True), down)


def grouped_enabled() -> bool:
    return os.environ.get("STRATA_MOE_GROUPED", "1") != "0"


def _offset(view: torch.Tensor, base: torch.Tensor) -> int | None:
    """Elements from base to view when both share one allocation, else None."""
    if view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return None
    if not view.is_contiguous() or view.dtype != base.dtype:
        return None
    return int(view.storage_offset() - base.storage_offset())


def _kernel_groups(experts: list[ExpertRows]) -> list[tuple[int, int, int, int]] | None:
    gate_up_base, down_base = experts[0].gate_up, experts[0].down
    groups: list[tuple[int, int, int, int]] = []
    for ex in experts:
        gu, dn = _offset(ex.gate_up, gate_up_base), _offset(ex.down, down_base)
        if gu is None or dn is None:
            return None
        groups.append((ex.start, ex.count, gu, dn))
    return groups


def run_experts(rows_in: torch.Tensor, rows_out: torch.Tensor, experts: list[ExpertRows]) -> None:
    """rows_out[rows of e] = expert_e(rows_in[rows of e]) for every e in `experts`."""
    experts = [ex for ex in experts if ex.count]
    if not experts:
        return
    first = experts[0]
    if (
        rows_in.is_cuda
        and grouped_enabled()
        and rows_in.dtype in KERNEL_DTYPES
        and first.gate_up.dtype == rows_in.dtype
        and rows_in.is_contiguous()
        and rows_out.is_contiguous()
    ):
        groups = _kernel_groups(experts)
        if groups is not None:
            from strata.ops.triton_grouped_experts import expert_tiles, grouped_mlp

            tiles = expert_tiles(groups, rows_in.device)
            grouped_mlp(rows_in, rows_out, first.gate_up, first.down, tiles, first.down.shape[1])
            return
    for ex in experts:
        rows = slice(ex.start, ex.start + ex.count)
        rows_out[rows] = expert_forward(rows_in[rows], ex.gate_up, ex.down)
