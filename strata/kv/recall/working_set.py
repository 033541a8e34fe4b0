"""WorkingSet: one sequence's recalled blocks on the GPU, per sparse layer and KV head.

    k, v:  [layers, kv_heads, slots, block_size, head_dim]
    tag:   [layers, kv_heads, slots]   the middle block a slot holds, -1 for none
    age:   [layers, kv_heads, slots]   updates since the slot's block was last picked

Over a page's whole buffers (buffers.py) every tensor has a rows dimension after the
layer's, and `update` works on every row at once, changing only the `active` ones.

A step's selection (`update`) names, per head, up to `picks` middle blocks (the budget;
picks <= slots). A selected block already held stays where it is (a hit); the others
(misses) go into the slots holding no selected block, least recently picked first (empty
slots before any), as `Moves` the sequence carries out (from the host store, or rebuilt
on the GPU). With more slots than picks, blocks picked in earlier steps stay while room
lasts, so a block picked again a few steps later is still a hit; only the selected
blocks are attended. Slot order means nothing: decode attention is over a set of
post-RoPE keys. Everything happens on the device, so no host sync decides what moves; on
CUDA one kernel does it (strata/ops/triton_working_set.py), elsewhere torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.kv.recall.buffers import Buffers, OwnBuffers

NEVER = 1 << 40  # the age of an empty slot: older than any block


class WorkingSet:
    # CUDA: `update` in one Triton kernel a layer, giving the same tensors (off: the torch
    # path; both compared in benchmarks/gpu_recall_check.py)
    update_kernel = True

    def __init__(
        self, layers: int, kv_heads: int, slots: int, block_size: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | None, buffers: Buffers | None = None,
    ) -> None:  # fmt: skip
        buffers = buffers or OwnBuffers(device)
        shape = (layers, kv_heads, slots, block_size, head_dim)
        self.k = buffers.tensor("ws.k", shape, dtype, layered=True)
        self.v = buffers.tensor("ws.v", shape, dtype, layered=True)
        self.tag = buffers.tensor("ws.tag", shape[:3], torch.long, layered=True, fill=-1)
        self.age = buffers.tensor("ws.age", shape[:3], torch.long, layered=True, fill=NEVER)
        self.slots = slots
        # selected and already held; fetched
        self.hits = buffers.tensor("ws.hits", (), torch.long, layered=False)
        self.misses = buffers.tensor("ws.misses", (), torch.long, layered=False)

    @staticmethod
    def nbytes_for(
        layers: int, kv_heads: int, slots: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        item = dtype.itemsize
        return 2 * layers * kv_heads * slots * (block_size * head_dim * item + 8)

    def update(
        self, layer: int, selected: torch.Tensor, active: torch.Tensor | None = None,
        counters: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Moves]:  # fmt: skip
        """Make the slots of `layer` hold `selected` ([..., kv_heads, picks] middle block
        ids, distinct per head, -1 for none). Returns ([..., kv_heads, slots] bool: the
        slots that hold a selected block, the moves the caller must carry out to fill
        them). `active` [rows] (a page): rows that are not keep their slots and move
        nothing. `counters`: the (hits, misses) to count into, if not the set's own."""
        tag, age = self.tag[layer], self.age[layer]
        hits, misses = counters if counters is not None else (self.hits, self.misses)
        if tag.is_cuda and self.update_kernel:
            from strata.ops.triton_working_set import update_slots

            attended, incoming, into, moving = update_slots(
                selected, tag, age, active, hits, misses, NEVER
            )
            return attended, Moves(incoming, into, moving)
        picks = selected.shape[-1]
        wanted = selected >= 0
        held = (selected[..., :, None] == tag[..., None, :]).any(-1) & wanted
        kept = (tag[..., :, None] == selected[..., None, :]).any(-1) & (tag >= 0)
        need = wanted & ~held
        # the slots a miss may take, oldest first (stable: lowest slot first among equals)
        oldest = torch.sort(torch.where(kept, -1, age), dim=-1, descending=True, stable=True)
        into = oldest.indices[..., :picks]
        need_first = torch.sort((~need).int(), dim=-1, stable=True).indices
        order = torch.arange(picks, device=tag.device)
        moving = order < need.sum(dim=-1, keepdim=True)  # [..., kv_heads, picks]
        incoming = selected.gather(-1, need_first)
        new_tag = tag.scatter(-1, into, torch.where(moving, incoming, tag.gather(-1, into)))
        # past the misses `into` may name kept slots: those stay attended
        attended = kept.scatter(-1, into, moving | kept.gather(-1, into))
        new_age = torch.where(attended, 0, torch.where(new_tag >= 0, age + 1, NEVER))
        if active is not None:
            on = active[:, None, None]
            new_tag, new_age = torch.where(on, new_tag, tag), torch.where(on, new_age, age)
            held, moving, attended = held & on, moving & on, attended & on
        tag.copy_(new_tag)
        age.copy_(new_age)
        hits += held.sum(dim=(-1, -2))
        misses += moving.sum(dim=(-1, -2))
        return attended, Moves(incoming.clamp(min=0), into, moving)

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
