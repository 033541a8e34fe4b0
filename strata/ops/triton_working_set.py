"""Triton kernel: a recall working set's update (WorkingSet.update) in one launch a layer.

One program per (row, head) of tag/age [lanes, slots], picks [lanes, picks] (block ids,
-1 for none, distinct otherwise):

    kept[s]     slot s holds a pick; held[p]: pick p is in some slot (a hit)
    need[p]     pick p is wanted and not held: a miss, ranked in pick order
    into[i]     the slots by age, oldest first (kept ones last, lower slot first among
                equals): miss i goes into slot into[i]
    tag, age    tag[into[i]] = miss i; age 0 where attended (kept or filled), +1 where a
                block stays unpicked, NEVER where empty
    outputs     attended [lanes, slots], incoming (miss i's block, 0 where none moves),
                into, moving (i < misses) [lanes, picks]; hits and misses added per row

A row that is not `active` changes nothing and moves nothing. The tensors are exactly what
the torch path (strata/kv/recall/working_set.py) computes from about 45 kernels a layer;
where nothing moves, `incoming` holds 0 and the torch path the other picks (no move reads
them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PICK_CHUNK = 16  # picks compared against every slot at once


@triton.jit
def _update_kernel(
    picks_ptr, tag_ptr, age_ptr, active_ptr, hits_ptr, misses_ptr,
    attended_ptr, incoming_ptr, into_ptr, moving_ptr,
    KVH, PICKS, SLOTS, NEVER, COUNT_STRIDE,
    HAS_ACTIVE: tl.constexpr, SLOTS_POW2: tl.constexpr, PICK_CHUNK: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    r = lane // KVH
    on = 1  # 1: the row takes part (masks below compare against counts scaled by it)
    if HAS_ACTIVE:
        on = tl.load(active_ptr + r).to(tl.int32)
    s = tl.arange(0, SLOTS_POW2)
    s_ok = s < SLOTS
    tag = tl.load(tag_ptr + lane * SLOTS + s, mask=s_ok, other=-1)
    age = tl.load(age_ptr + lane * SLOTS + s, mask=s_ok, other=0)
    kept = tl.zeros((SLOTS_POW2,), dtype=tl.int32)
    misses = 0
    hits = 0
    for p0 in range(0, PICKS, PICK_CHUNK):
        p = p0 + tl.arange(0, PICK_CHUNK)
        pick = tl.load(picks_ptr + lane * PICKS + p, mask=p < PICKS, other=-1)
        same = ((pick[:, None] == tag[None, :]) & (pick[:, None] >= 0)).to(tl.int32)
        kept = kept | tl.max(same, axis=0)
        held = tl.max(same, axis=1)
        need = ((pick >= 0) & (held == 0)).to(tl.int32)
        rank = misses + tl.cumsum(need, axis=0) - 1
        tl.store(incoming_ptr + lane * PICKS + rank, pick, mask=need != 0)
        misses += tl.sum(need)
        hits += tl.sum(held)
    tl.store(attended_ptr + lane * SLOTS + s, (kept * on).to(tl.uint8), mask=s_ok)
    # oldest first: age descending (kept slots below any age), lower slot first among equals
    key = tl.where(kept != 0, -1, age)
    order = tl.where(s_ok, NEVER + 1 - key, 2 * NEVER + 4) * SLOTS_POW2 + s
    by_age = tl.sort(order, 0) % SLOTS_POW2
    i = s  # a position in by_age
    tl.store(into_ptr + lane * PICKS + i, by_age, mask=i < PICKS)
    tl.debug_barrier()  # the incoming blocks stored above are read back below
    filled = i < misses * on
    block = tl.load(incoming_ptr + lane * PICKS + i, mask=i < misses, other=0)
    tl.store(tag_ptr + lane * SLOTS + by_age, block, mask=filled)
    tl.store(attended_ptr + lane * SLOTS + by_age, filled.to(tl.uint8), mask=filled)
    past = (i >= misses * on) & (i < PICKS)  # where nothing moves
    tl.store(incoming_ptr + lane * PICKS + i, tl.zeros_like(block), mask=past)
    tl.store(moving_ptr + lane * PICKS + i, filled.to(tl.uint8), mask=i < PICKS)
    tl.debug_barrier()  # the filled slots' attended flags are read back below
    attended = tl.load(attended_ptr + lane * SLOTS + s, mask=s_ok, other=0) != 0
    new_age = tl.where(attended, 0, tl.where(tag >= 0, age + 1, NEVER))
    tl.store(age_ptr + lane * SLOTS + s, new_age, mask=s < SLOTS * on)
    if on != 0:
        tl.atomic_add(hits_ptr + r * COUNT_STRIDE, hits)
        tl.atomic_add(misses_ptr + r * COUNT_STRIDE, misses)


def update_slots(
    picks: torch.Tensor, tag: torch.Tensor, age: torch.Tensor, active: torch.Tensor | None,
    hits: torch.Tensor, misses: torch.Tensor, never: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """See the module docstring. picks [..., kv_heads, picks] (long), tag and age
    [..., kv_heads, slots] (long, contiguous: updated in place), active [rows] bool or
    None, hits and misses long counters [rows] (a page) or [] (one sequence). Returns
    attended [..., kv_heads, slots] bool, and incoming, into (long) and moving (bool)
    [..., kv_heads, picks]."""
    if not (tag.is_contiguous() and age.is_contiguous()):
        raise ValueError("update_slots updates tag and age in place: they must be contiguous")
    kvh, num_picks, slots = picks.shape[-2], picks.shape[-1], tag.shape[-1]
    if num_picks > slots:
        raise ValueError(f"{num_picks} picks do not fit {slots} working-set slots")
    lanes = tag.numel() // slots
    picks = picks.contiguous()
    attended = torch.empty(tag.shape, dtype=torch.bool, device=tag.device)
    incoming = torch.empty(picks.shape, dtype=torch.long, device=tag.device)
    into = torch.empty_like(incoming)
    moving = torch.empty(picks.shape, dtype=torch.bool, device=tag.device)
    if lanes == 0:
        return attended, incoming, into, moving
    flag = active.view(torch.uint8) if active is not None else attended.view(torch.uint8)
    _update_kernel[(lanes,)](
        picks, tag, age, flag, hits, misses,
        attended.view(torch.uint8), incoming, into, moving.view(torch.uint8),
        kvh, num_picks, slots, never, 1 if hits.dim() else 0,
        HAS_ACTIVE=active is not None, SLOTS_POW2=triton.next_power_of_2(slots),
        PICK_CHUNK=PICK_CHUNK,
    )  # fmt: skip
    return attended, incoming, into, moving
