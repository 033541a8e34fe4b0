"""The fused fetch (strata/ops/triton_row_copy.py fetch_blocks), under Triton's
interpreter: it copies exactly the rows the torch path copies (fetch.host_rows and
Moves.destination_rows, then copy_rows), for a page's rows and for one sequence's own
tables, and leaves every other working-set row alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from strata.kv.recall.fetch import host_rows
from strata.kv.recall.rows import copy_rows
from strata.kv.recall.working_set import Moves
from tests.triton_interpret import interpreted


@pytest.mark.parametrize("rows", [3, 0])
def test_the_kernel_copies_the_torch_paths_rows(rows: int) -> None:
    """rows 0: one sequence (tables and moves without a rows dimension)."""
    torch.manual_seed(rows)
    layers, num_slots, kvh, row, room, picks, ws_slots, s = 3, 20, 2, 48, 12, 5, 7, 1
    store = SimpleNamespace(num_slots=num_slots)
    host = torch.randn(layers * num_slots * kvh, row)
    lead = (rows,) if rows else ()
    lanes = max(rows, 1) * kvh
    table = torch.stack([torch.randperm(num_slots)[:room] for _ in range(max(rows, 1))])
    table = table.view(*lead, room)
    moves = Moves(
        blocks=torch.stack([torch.randperm(room)[:picks] for _ in range(lanes)]).view(
            *lead, kvh, picks),
        slots=torch.stack([torch.randperm(ws_slots)[:picks] for _ in range(lanes)]).view(
            *lead, kvh, picks),
        mask=torch.rand(*lead, kvh, picks) < 0.6,
    )  # fmt: skip
    dst = torch.randn(lanes * ws_slots, row)
    expected, got = dst.clone(), dst.clone()
    src = torch.where(moves.mask, host_rows(store, table, s, moves.blocks), -1).flatten()  # type: ignore[arg-type]
    copy_rows(host, expected, src, moves.destination_rows(ws_slots))
    assert not torch.equal(expected, dst)
    one = (lambda x: x[None]) if not rows else (lambda x: x)
    with interpreted("strata.ops.triton_row_copy") as module:
        module.fetch_blocks(host, got, one(table), s * num_slots, one(moves.blocks),
                            one(moves.slots), one(moves.mask), ws_slots)  # fmt: skip
    assert torch.equal(got, expected)


def test_rows_it_cannot_copy_are_refused() -> None:
    from strata.ops.triton_row_copy import fetch_blocks

    moves = (torch.zeros(1, 2, 3, dtype=torch.long),) * 2 + (torch.ones(1, 2, 3, dtype=torch.bool),)
    table = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="rows of the same dtype and width"):
        fetch_blocks(torch.zeros(8, 16), torch.zeros(8, 16, dtype=torch.float16), table, 0,
                     *moves, 4)  # fmt: skip
    with pytest.raises(ValueError, match="contiguous source and destination"):
        fetch_blocks(torch.zeros(16, 8).T, torch.zeros(8, 16), table, 0, *moves, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads pinned host memory on a GPU")
def test_the_compiled_kernel_reads_pinned_host_rows() -> None:
    """The 8B shape's rows (16 tokens x 128 dims, bf16) from a pinned host store into a
    page of 4 rows on the GPU, against copy_rows with the torch path's indices."""
    from strata.ops.triton_row_copy import fetch_blocks

    torch.manual_seed(4)
    rows, kvh, num_slots, room, picks, ws_slots, s = 4, 8, 64, 48, 32, 40, 2
    store = SimpleNamespace(num_slots=num_slots)
    host = torch.randn(3 * num_slots * kvh, 2048).to(torch.bfloat16).pin_memory()
    table = torch.stack([torch.randperm(num_slots)[:room] for _ in range(rows)]).cuda()
    moves = Moves(
        torch.stack([torch.randperm(room)[:picks] for _ in range(rows * kvh)]).view(
            rows, kvh, picks).cuda(),
        torch.stack([torch.randperm(ws_slots)[:picks] for _ in range(rows * kvh)]).view(
            rows, kvh, picks).cuda(),
        (torch.rand(rows, kvh, picks) < 0.6).cuda(),
    )  # fmt: skip
    expected = torch.zeros(rows * kvh * ws_slots, 2048, dtype=torch.bfloat16, device="cuda")
    got = expected.clone()
    src = torch.where(moves.mask, host_rows(store, table, s, moves.blocks), -1).flatten()  # type: ignore[arg-type]
    copy_rows(host, expected, src, moves.destination_rows(ws_slots))
    fetch_blocks(host, got, table, s * num_slots, moves.blocks, moves.slots, moves.mask,
                 ws_slots)  # fmt: skip
    assert torch.equal(got, expected) and bool(expected.abs().sum() > 0)
