"""The working-set update kernel (strata/ops/triton_working_set.py), under Triton's
interpreter, against the torch path (WorkingSet.update) over several steps: the same
tags, ages, attended slots, moves and hit and miss counts, for pages with rows that sit
out a step, slots that are not a power of two, picks of -1, and one sequence's own
working set."""

from __future__ import annotations

import pytest
import torch

from strata.kv.recall.buffers import OwnBuffers
from strata.kv.recall.working_set import NEVER, WorkingSet
from tests.triton_interpret import interpreted

KERNEL = "strata.ops.triton_working_set"


def random_picks(lead: tuple[int, ...], kvh: int, picks: int, blocks: int) -> torch.Tensor:
    """Distinct block ids per head, some -1 (fewer live blocks than picks)."""
    lanes = int(torch.tensor(lead).prod()) * kvh
    ids = torch.stack([torch.randperm(blocks)[:picks] for _ in range(lanes)])
    ids = torch.where(torch.rand(ids.shape) < 0.1, -1, ids)
    return ids.view(*lead, kvh, picks)


@pytest.mark.parametrize(
    ("rows", "kvh", "picks", "slots", "blocks"),
    [(3, 2, 5, 6, 9), (2, 2, 16, 16, 24), (1, 3, 20, 40, 30), (0, 2, 4, 8, 10)],
)
def test_the_kernel_updates_as_the_torch_path(
    rows: int, kvh: int, picks: int, slots: int, blocks: int
) -> None:
    """rows 0: one sequence's working set (no rows dimension, no active rows)."""
    torch.manual_seed(rows * 100 + slots)
    lead = (rows,) if rows else ()
    torch_ws, kernel_ws = (WorkingSet(1, kvh, slots, 16, 8, torch.float32, None,
                                      OwnBuffers(None, rows)) for _ in range(2))  # fmt: skip
    with interpreted(KERNEL) as module:
        for step in range(6):
            selected = random_picks(lead, kvh, picks, blocks)
            active = (torch.rand(rows) < 0.7) if rows else None
            if active is not None and step == 0:
                active[0] = True
            held, moves = torch_ws.update(0, selected, active)
            attended, incoming, into, moving = module.update_slots(
                selected, kernel_ws.tag[0], kernel_ws.age[0], active, kernel_ws.hits,
                kernel_ws.misses, NEVER,
            )  # fmt: skip
            assert torch.equal(attended, held), step
            assert torch.equal(moving, moves.mask), step
            assert torch.equal(into, moves.slots), step
            assert torch.equal(incoming[moving], moves.blocks[moves.mask]), step
            assert torch.equal(incoming[~moving], torch.zeros_like(incoming[~moving]))
            assert torch.equal(kernel_ws.tag, torch_ws.tag), step
            assert torch.equal(kernel_ws.age, torch_ws.age), step
            assert torch.equal(kernel_ws.hits, torch_ws.hits), step
            assert torch.equal(kernel_ws.misses, torch_ws.misses), step
    assert int(torch_ws.hits.sum()) > 0 and int(torch_ws.misses.sum()) > 0


def test_more_picks_than_slots_and_strided_state_are_refused() -> None:
    from strata.ops.triton_working_set import update_slots

    tag = torch.full((2, 3), -1, dtype=torch.long)
    counters = (torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match="4 picks do not fit 3"):
        update_slots(torch.zeros(2, 4, dtype=torch.long), tag, tag.clone(), None, *counters,
                     NEVER)  # fmt: skip
    strided = torch.full((3, 2), -1, dtype=torch.long).T
    with pytest.raises(ValueError, match="tag and age in place: they must be contiguous"):
        update_slots(torch.zeros(2, 2, dtype=torch.long), strided, tag.clone(), None,
                     *counters, NEVER)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the kernel for a GPU")
@pytest.mark.parametrize("slots", [128, 512])
def test_the_compiled_kernel_on_the_8b_shape(slots: int) -> None:
    """A page of 4 rows, 8 KV heads, 128 picks of 8,192 blocks: the kernel against the
    torch path, both on the GPU, over steps whose picks overlap."""
    from strata.ops.triton_working_set import update_slots

    torch.manual_seed(3)
    rows, kvh, picks, blocks = 4, 8, 128, 8192
    cuda = torch.device("cuda")
    torch_ws, kernel_ws = (WorkingSet(1, kvh, slots, 16, 8, torch.float32, cuda,
                                      OwnBuffers(cuda, rows)) for _ in range(2))  # fmt: skip
    torch_ws.update_kernel = False
    previous = random_picks((rows,), kvh, picks, blocks)
    for _ in range(8):
        fresh = random_picks((rows,), kvh, picks, blocks)
        keep = torch.rand(rows, kvh, picks) < 0.5  # about half picked again
        selected = torch.where(keep & (previous >= 0), previous, -1)
        free = ~torch.isin(fresh, selected.flatten())  # distinct per head
        selected = torch.where(selected >= 0, selected, torch.where(free, fresh, -1)).cuda()
        active = (torch.rand(rows) < 0.8).cuda()
        held, moves = torch_ws.update(0, selected, active)
        got = update_slots(selected, kernel_ws.tag[0], kernel_ws.age[0], active,
                           kernel_ws.hits, kernel_ws.misses, NEVER)  # fmt: skip
        assert torch.equal(got[0], held) and torch.equal(got[3], moves.mask)
        assert torch.equal(got[2], moves.slots)
        assert torch.equal(got[1][got[3]], moves.blocks[moves.mask])
        previous = selected.cpu()
    for name in ("tag", "age", "hits", "misses"):
        assert torch.equal(getattr(kernel_ws, name), getattr(torch_ws, name)), name
