"""Copies between the KV block pool and CPU tier slots, in one contiguous layout.

    KV pool  parts: [layers, num_blocks, *part shape]  (codec.py; auto: k, v)   (device)
    slot          : [layers, part 0 bytes | part 1 bytes | ...]  (CPU slab row)

With the `auto` codec a slot is [layers, k|v, tokens, kv heads, head dim] in the model
dtype; a coded block carries its codec's parts the same way, layer after layer.

On CUDA a batch goes through a device staging buffer so that each host copy is one
contiguous transfer per block (or per run of adjacent slots):

    store: pool --gather (side stream)--> stage --D2H--> pinned slots
    load:  pinned slots --H2D--> stage --scatter (side stream)--> pool

Every call runs on the KV mover thread and returns when its copies are complete, so
the caller may publish slots or hand blocks to the scheduler right after. On CPU the
copies are direct. `after` (a CUDA event recorded on the compute stream) orders a
store behind the step that computed the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strata.kv.cache import KVCache

STAGE_BYTES = 128 << 20


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first index in the batch, first slot, length) of runs of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            start, first, n = runs[-1]
            runs[-1] = (start, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


class BlockTransfer:
    def __init__(self, kv: KVCache, slab: torch.Tensor) -> None:
        self.kv = kv
        self.slab = slab
        self.device = kv.device
        layers = kv.num_layers
        # Each pool part as bytes [layers, num_blocks, part bytes], and its columns in a slot.
        self.part_bytes = [p.view(layers, p.shape[1], -1).view(torch.uint8) for p in kv.parts]
        self.columns: list[tuple[int, int]] = []
        offset = 0
        for part in self.part_bytes:
            self.columns.append((offset, offset + part.shape[2]))
            offset += part.shape[2]
        self.block_shape = (layers, offset)
        self.block_bytes = slab.shape[1]
        if self.block_bytes != layers * offset:
            raise ValueError(f"tier slots hold {self.block_bytes} bytes, a block {layers * offset}")
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.chunk = max(1, min(256, STAGE_BYTES // self.block_bytes))
            self.stage = torch.empty(
                (self.chunk, *self.block_shape), dtype=torch.uint8, device=self.device
            )
            self.stream = torch.cuda.Stream(self.device)
        else:
            self.chunk = 256

    def _slot(self, slot: int) -> torch.Tensor:
        return self.slab[slot].view(self.block_shape)

    # ---- pool -> slots --------------------------------------------------------------------

    def store(
        self, block_ids: Sequence[int], slots: Sequence[int], after: torch.cuda.Event | None
    ) -> None:
        for lo in range(0, len(block_ids), self.chunk):
            ids, dst = block_ids[lo : lo + self.chunk], slots[lo : lo + self.chunk]
            if self.cuda:
                self._store_cuda(ids, dst, after)
            else:
                for block_id, slot in zip(ids, dst, strict=True):
                    out = self._slot(slot)
                    for part, (a, b) in zip(self.part_bytes, self.columns, strict=True):
                        out[:, a:b].copy_(part[:, block_id])

    def _store_cuda(
        self, ids: Sequence[int], slots: Sequence[int], after: torch.cuda.Event | None
    ) -> None:
        n = len(ids)
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            index = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
            stage = self.stage[:n]
            for part, (a, b) in zip(self.part_bytes, self.columns, strict=True):
                stage[:, :, a:b].copy_(part.index_select(1, index).transpose(0, 1))
            flat = stage.view(n, -1)
            for start, first, length in _runs(slots):
                self.slab[first : first + length].copy_(
                    flat[start : start + length], non_blocking=True
                )
        self.stream.synchronize()

    # ---- slots -> pool --------------------------------------------------------------------

    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        for lo in range(0, len(block_ids), self.chunk):
            src, ids = slots[lo : lo + self.chunk], block_ids[lo : lo + self.chunk]
            if self.cuda:
                self._load_cuda(src, ids)
            else:
                for slot, block_id in zip(src, ids, strict=True):
                    block = self._slot(slot)
                    for part, (a, b) in zip(self.part_bytes, self.columns, strict=True):
                        part[:, block_id].copy_(block[:, a:b])

    def _load_cuda(self, slots: Sequence[int], ids: Sequence[int]) -> None:
        n = len(ids)
        with torch.cuda.stream(self.stream):
            stage = self.stage[:n]
            flat = stage.view(n, -1)
            for start, first, length in _runs(slots):
                flat[start : start + length].copy_(
                    self.slab[first : first + length], non_blocking=True
                )
            index = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
            for part, (a, b) in zip(self.part_bytes, self.columns, strict=True):
                part.index_copy_(1, index, stage[:, :, a:b].transpose(0, 1))
        self.stream.synchronize()
