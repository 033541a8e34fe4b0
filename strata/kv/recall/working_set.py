"""WorkingSet: one sequence's recalled blocks on the GPU, per sparse layer and KV head.

    k, v:  [layers, kv_heads, slots, block_size, head_dim]
    tag:   [layers, kv_heads, slots]   the middle block a slot holds, -1 for none

A step's selection (`update`) names, per head, up to `slots` middle blocks. A selected
block already held stays where it is (a hit); the others are fetched from the host
store into the slots whose blocks were not selected again (misses). Slot order means
nothing: decode attention is over a set of post-RoPE keys. Everything happens on the
device, so no host sync decides what moves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from strata.kv.recall.rows import copy_rows


class WorkingSet:
    def __init__(
        self, layers: int, kv_heads: int, slots: int, block_size: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        shape = (layers, kv_heads, slots, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tag = torch.full((layers, kv_heads, slots), -1, dtype=torch.long, device=device)
        self.slots = slots
        self.hits = torch.zeros((), dtype=torch.long, device=device)  # selected, already held
        self.misses = torch.zeros((), dtype=torch.long, device=device)  # fetched

    @staticmethod
    def nbytes_for(
        layers: int, kv_heads: int, slots: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        item = dtype.itemsize
        return 2 * layers * kv_heads * slots * block_size * head_dim * item

    def update(
        self,
        layer: int,
        selected: torch.Tensor,
        host_rows: Callable[[torch.Tensor], torch.Tensor],
        host_k: torch.Tensor,
        host_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the slots of `layer` hold `selected` ([kv_heads, slots] middle block ids,
        distinct per head, -1 for none); `host_rows` maps such ids to rows of the flat host
        store (host_k, host_v: [rows, block_size * head_dim]). Returns ([kv_heads, slots]
        bool: the slots that hold a selected block, the rows fetched: a 0-d tensor)."""
        tag = self.tag[layer]
        wanted = selected >= 0
        held = (selected[:, :, None] == tag[:, None, :]).any(-1) & wanted
        kept = (tag[:, :, None] == selected[:, None, :]).any(-1) & (tag >= 0)
        need = wanted & ~held
        free_first = torch.sort(kept.int(), dim=1, stable=True).indices
        need_first = torch.sort((~need).int(), dim=1, stable=True).indices
        order = torch.arange(self.slots, device=tag.device)
        moves = order[None, :] < need.sum(dim=1, keepdim=True)  # [kv_heads, slots]
        incoming = selected.gather(1, need_first)
        new_tag = torch.where(kept, tag, -1)
        new_tag.scatter_(1, free_first, torch.where(moves, incoming, new_tag.gather(1, free_first)))
        src = torch.where(moves, host_rows(incoming.clamp(min=0)), -1).flatten()
        heads = torch.arange(tag.shape[0], device=tag.device)[:, None]
        dst = (heads * self.slots + free_first).flatten()
        row = self.k.shape[-2] * self.k.shape[-1]
        copy_rows(host_k, self.k[layer].view(-1, row), src, dst)
        copy_rows(host_v, self.v[layer].view(-1, row), src, dst)
        self.tag[layer] = new_tag
        fetched = moves.sum()
        self.hits += held.sum()
        self.misses += fetched
        return new_tag >= 0, fetched
