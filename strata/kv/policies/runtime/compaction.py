"""Compaction: a policy's keep mask applied to a sequence's blocks, freeing the rest.

In each (layer, KV head) with n slots of which k stay, the survivors end up in slots
[0, k) with the fewest moves: a kept slot below k stays where it is, and the kept slots
at or above k fill the evicted slots below k, in order.

    slots     0 1 2 3 4 5 6 7        keep = {0, 2, 5, 6}, k = 4
    keep      x . x . . x x .        holes below k: 1, 3   movers from k on: 5, 6
    after     0 5 2 6                new_to_old = [0, 5, 2, 6]

Moves cost O(evicted), not O(kept): one eviction while decoding moves one slot per head.
Slot order within the kept set no longer follows positions; attention over cached
tokens does not care, and tokens computed later take slots k, k+1, ... in order, so a
new query still attends causally to the slots at or below its own.

The sequence's table shrinks to the blocks that hold [0, k) of the longest layer. A head
block that is shared or in the prefix index is first copied to a private one (the
scheduler reserves spare blocks for that), so cached uncompressed blocks stay valid.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from strata.kv.cache import KVCache
from strata.kv.manager import KVManager
from strata.kv.policies.base import Compaction


def plan_moves(keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keep: [..., n] bool, exactly k True per row.

    Returns (new_to_old [..., k], src [..., c], dst [..., c]) with c = min(k, n - k):
    slot src[j] moves to dst[j]; rows with fewer moves pad with src == dst."""
    n = keep.shape[-1]
    identity = torch.arange(k, device=keep.device).expand(*keep.shape[:-1], k)
    c = min(k, n - k)
    if c == 0:
        empty = identity[..., :0]
        return identity.contiguous(), empty, empty
    front, back = keep[..., :k], keep[..., k:]
    # Stable sorts list the evicted slots below k first, and the kept slots from k first.
    holes = torch.sort(front.int(), dim=-1, stable=True).indices[..., :c]
    movers = torch.sort((~back).int(), dim=-1, stable=True).indices[..., :c] + k
    num_holes = (~front).sum(dim=-1, keepdim=True)
    real = torch.arange(c, device=keep.device) < num_holes
    src = torch.where(real, movers, holes)
    new_to_old = identity.clone().scatter_(-1, holes, src)
    return new_to_old, src, holes


def _physical(table: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    return table[slots // block_size] * block_size + slots % block_size


def _flat(pool: torch.Tensor) -> torch.Tensor:
    """[layers, blocks, block_size, heads, dim] -> [layers, blocks * block_size, heads, dim]."""
    return pool.view(pool.shape[0], -1, *pool.shape[3:])


def read_slots(
    cache: KVCache, table: torch.Tensor, layer: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [num_slots, kv_heads, head_dim] of a sequence's first slots in a layer."""
    phys = _physical(table, torch.arange(num_slots, device=table.device), cache.block_size)
    return _flat(cache.k)[layer, phys], _flat(cache.v)[layer, phys]


def compact(
    manager: KVManager,
    cache: KVCache,
    seq_id: str,
    masks: list[torch.Tensor],
    keep: list[int],
    heads: slice = slice(None),
) -> tuple[Compaction, TableChange]:
    """Keep, in each layer l, the slots masks[l] ([kv_heads, n_l], keep[l] True per head).

    heads: the rows of the masks this pool holds (tensor parallelism: the rank's KV
    heads); the Compaction covers every row. Also returns the table change, which the
    other ranks apply to their own heads (rank_compaction.py)."""
    old_slots = [int(m.shape[-1]) for m in masks]
    counts = torch.stack([m.sum(dim=-1) for m in masks]).cpu()  # one sync, rare
    for layer, k in enumerate(keep):
        if not bool((counts[layer] == k).all()):
            raise ValueError(
                f"KV policy kept {counts[layer].tolist()} slots per head in layer {layer}, "
                f"expected {k} in each"
            )
    bs = cache.block_size
    head_blocks = -(-max(keep) // bs)
    data_blocks = -(-max(old_slots) // bs)
    change = TableChange(*manager.compact_table(seq_id, head_blocks, data_blocks))
    new_to_old = move_slots(cache, change, [m[heads] for m in masks], keep)
    if heads != slice(None):
        new_to_old = [plan_moves(m, k)[0] for m, k in zip(masks, keep, strict=True)]
    return Compaction(new_to_old, old_slots), change


@dataclass(frozen=True)
class TableChange:
    """A compacted sequence's table before and after, and the blocks copied first."""

    old: list[int]
    new: list[int]
    copies: list[tuple[int, int]]


def move_slots(
    cache: KVCache, change: TableChange, masks: list[torch.Tensor], keep: list[int]
) -> list[torch.Tensor]:
    """Copy shared head blocks, then move each head's kept slots into [0, keep[l]) of the
    new table; per layer new_to_old [heads, keep[l]] of these heads."""
    bs = cache.block_size
    device = cache.k.device
    if change.copies:
        src = torch.tensor([a for a, _ in change.copies], device=device)
        dst = torch.tensor([b for _, b in change.copies], device=device)
        for pool in (cache.k, cache.v):
            pool[:, dst] = pool[:, src]
    old_t = torch.tensor(change.old, device=device)
    new_t = torch.tensor(change.new, device=device)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for layer, (m, k) in enumerate(zip(masks, keep, strict=True)):
        groups[(int(m.shape[-1]), k)].append(layer)
    new_to_old: list[torch.Tensor] = [torch.empty(0)] * len(masks)
    heads = torch.arange(cache.k.shape[3], device=device)[None, :, None]
    for (_, k), layers in groups.items():
        index, src, dst = plan_moves(torch.stack([masks[i] for i in layers]), k)
        for i, layer in enumerate(layers):
            new_to_old[layer] = index[i]
        if src.shape[-1] == 0:
            continue
        rows = torch.tensor(layers, device=device)[:, None, None]
        src_phys = _physical(old_t, src, bs)
        dst_phys = _physical(new_t, dst, bs)
        for pool in (cache.k, cache.v):
            flat = _flat(pool)
            flat[rows, dst_phys, heads] = flat[rows, src_phys, heads]
    return new_to_old
