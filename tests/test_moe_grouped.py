"""The grouped expert kernel (strata/ops/triton_grouped_experts.py) against the per-expert torch
computation, on CPU under Triton's interpreter.

The fixture imports the kernel module under the interpreter (tests/triton_interpret.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from strata.ops.grouped_experts import expert_forward
from tests.triton_interpret import interpreted

pytest.importorskip("triton")

KERNEL_MODULE = "strata.ops.triton_grouped_experts"


@pytest.fixture(scope="module")
def kernel() -> Iterator[ModuleType]:
    with interpreted(KERNEL_MODULE) as module:
        yield module


def test_tiles_cut_each_expert_into_block_m_rows(kernel: ModuleType) -> None:
    m = kernel.BLOCK_M
    tiles = kernel.expert_tiles([(0, 2 * m + 1, 100, 7), (2 * m + 1, 1, -50, -3)], "cpu")
    assert tiles.tolist() == [
        [0, m, 100, 7],
        [m, 2 * m, 100, 7],
        [2 * m, 2 * m + 1, 100, 7],
        [2 * m + 1, 2 * m + 2, -50, -3],
    ]


def _check(
    kernel: ModuleType,
    rows_in: torch.Tensor,
    experts: list[tuple[int, int, torch.Tensor, torch.Tensor]],
    gate_up_base: torch.Tensor,
    down_base: torch.Tensor,
    covered: int,
) -> None:
    """Runs the kernel on `experts` (start, count, gate_up view, down view) and compares
    every covered row with expert_forward; rows past `covered` must stay unwritten."""
    f = gate_up_base.shape[-2] // 2
    rows_out = torch.full_like(rows_in, float("nan"))
    groups = [
        (start, count, gu.storage_offset() - gate_up_base.storage_offset(),
         dn.storage_offset() - down_base.storage_offset())
        for start, count, gu, dn in experts
    ]  # fmt: skip
    tiles = kernel.expert_tiles(groups, rows_in.device)
    kernel.grouped_mlp(rows_in, rows_out, gate_up_base, down_base, tiles, f)
    expected = torch.full_like(rows_in, float("nan"))
    for start, count, gu, dn in experts:
        expected[start : start + count] = expert_forward(rows_in[start : start + count], gu, dn)
    assert not rows_out[:covered].isnan().any()  # every row of every tile written
    assert rows_out[covered:].isnan().all()  # nothing else
    torch.testing.assert_close(rows_out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_slots_of_one_arena_in_any_order(kernel: ModuleType) -> None:
    """Slots as in the expert arena: flat experts [gate_up 2F x H | down H x F] in one
    buffer; the first group's slot is not the lowest (negative offsets), one expert has
    no rows, one spans three tiles; H and F are not multiples of the block sizes."""
    gen = torch.Generator().manual_seed(0)
    h, f, num_slots = 40, 24, 5
    numel = 3 * f * h
    arena = torch.randn(num_slots * numel + 7, generator=gen) * 0.2

    def slot(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = arena[7 + j * numel : 7 + (j + 1) * numel]
        return flat[: 2 * f * h].view(2 * f, h), flat[2 * f * h :].view(h, f)

    counts_slots = [(3, 4), (0, 1), (2 * 16 + 3, 0), (1, 2)]
    rows = sum(c for c, _ in counts_slots)
    rows_in = torch.randn(rows + 5, h, generator=gen)
    experts, start = [], 0
    for count, j in counts_slots:
        gu, dn = slot(j)
        experts.append((start, count, gu, dn))
        start += count
    base_gu, base_dn = slot(4)
    _check(kernel, rows_in, experts, base_gu, base_dn, covered=rows)


def test_stacked_experts_slot_is_expert_id(kernel: ModuleType) -> None:
    """ResidentExperts' layout: gate_up [E, 2F, H] and down [E, H, F], two allocations."""
    gen = torch.Generator().manual_seed(1)
    e, h, f = 6, 32, 48
    gate_up = torch.randn(e, 2 * f, h, generator=gen) * 0.2
    down = torch.randn(e, h, f, generator=gen) * 0.2
    counts = [2, 0, 17, 1, 0, 5]
    rows = sum(counts)
    rows_in = torch.randn(rows, h, generator=gen)
    experts, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            experts.append((start, count, gate_up[expert], down[expert]))
            start += count
    _check(kernel, rows_in, experts, gate_up[0], down[0], covered=rows)
