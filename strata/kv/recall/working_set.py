"""WorkingSet: one sequence's recalled blocks on the GPU, per sparse layer and KV head.

    k, v:  [layers, kv_heads, slots, block_size, head_dim]
    tag:   [layers, kv_heads, slots]   the middle block a slot holds, -1 for none

Over a page's whole buffers (buffers.py) every tensor has a rows dimension after the
layer's, and `update` works on every row at once, changing only the `active` ones.

A step's selection (`update`) names, per head, up to `slots` middle blocks. A selected
block already held stays where it is (a hit); the others (misses) go into the slots
whose blocks were not selected again, as `Moves` the sequence carries out (from the host
store, or rebuilt on the GPU). Slot order means nothing: decode attention is over a set
of post-RoPE keys. Everything happens on the device, so no host sync decides what moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.kv.recall.buffers import Buffers, OwnBuffers


class WorkingSet:
    def __init__(
        self, layers: int, kv_heads: int, slots: int, block_size: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | None, buffers: Buffers | None = None,
    ) -> None:  # fmt: skip
        buffers = buffers or OwnBuffers(device)
        shape = (layers, kv_heads, slots, block_size, head_dim)
        self.k = buffers.tensor("ws.k", shape, dtype, layered=True)
        self.v = buffers.tensor("ws.v", shape, dtype, layered=True)
        self.tag = buffers.tensor("ws.tag", shape[:3], torch.long, layered=True, fill=-1)
        self.slots = slots
        # selected and already held; fetched
        self.hits = buffers.tensor("ws.hits", (), torch.long, layered=False)
        self.misses = buffers.tensor("ws.misses", (), torch.long, layered=False)

    @staticmethod
    def nbytes_for(
        layers: int, kv_heads: int, slots: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        item = dtype.itemsize
        return 2 * layers * kv_heads * slots * block_size * head_dim * item

    def update(
        self, layer: int, selected: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Moves]:
        """Make the slots of `layer` hold `selected` ([..., kv_heads, slots] middle block
        ids, distinct per head, -1 for none). Returns ([..., kv_heads, slots] bool: the
        slots that hold a selected block, the moves the caller must carry out to fill
        them). `active` [rows] (a page): rows that are not keep their slots and move
        nothing."""
        tag = self.tag[layer]
        wanted = selected >= 0
        held = (selected[..., :, None] == tag[..., None, :]).any(-1) & wanted
        kept = (tag[..., :, None] == selected[..., None, :]).any(-1) & (tag >= 0)
        need = wanted & ~held
        free_first = torch.sort(kept.int(), dim=-1, stable=True).indices
        need_first = torch.sort((~need).int(), dim=-1, stable=True).indices
        order = torch.arange(self.slots, device=tag.device)
        moving = order < need.sum(dim=-1, keepdim=True)  # [..., kv_heads, slots]
        incoming = selected.gather(-1, need_first)
        new_tag = torch.where(kept, tag, -1)
        arriving = torch.where(moving, incoming, new_tag.gather(-1, free_first))
        new_tag.scatter_(-1, free_first, arriving)
        if active is not None:
            on = active[:, None, None]
            new_tag = torch.where(on, new_tag, tag)
            held, moving = held & on, moving & on
        tag.copy_(new_tag)
        self.hits += held.sum(dim=(-1, -2))
        self.misses += moving.sum(dim=(-1, -2))
        return new_tag >= 0, Moves(incoming.clamp(min=0), free_first, moving)

    def rows(self, layer: int, part: torch.Tensor) -> torch.Tensor:
        """`part` (self.k or self.v) of `layer` as [kv_heads * slots, block_size * head_dim]
        rows; row h * slots + s is slot s of head h."""
        return part[layer].view(-1, part.shape[-2] * part.shape[-1])


@dataclass(frozen=True)
class Moves:
    """Fetches a working-set update asks for: where `mask`, middle block `blocks[h, i]`
    of head h goes into slot `slots[h, i]` ([..., kv_heads, slots] each; slots distinct
    per head)."""

    blocks: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor

    def destination_rows(self, num_slots: int) -> torch.Tensor:
        """Flat working-set rows (WorkingSet.rows) of every entry, [... * kv_heads * slots]
        (in a page, row r's head h is the r * kv_heads + h'th head of the layer)."""
        lanes = self.slots.numel() // self.slots.shape[-1]
        heads = torch.arange(lanes, device=self.slots.device).view(self.slots.shape[:-1])
        return (heads[..., None] * num_slots + self.slots).flatten()
