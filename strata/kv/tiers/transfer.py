"""Copies between the KV block pool and CPU tier slots, in one contiguous layout.

    KV pool  parts: [layers, num_blocks, *part shape]  (codec.py; auto: k, v)   (device)
    slot          : [layers, part 0 bytes | part 1 bytes | ...]  (CPU slab row)

With the `auto` codec a slot is [layers, k|v, tokens, kv heads, head dim] in the model
dtype; a coded block carries its codec's parts the same way, layer after layer. With a
tier codec the gather encodes and the scatter decodes (slot_codec.py), on the pool's
device, so the host copies move coded bytes.

On CUDA a batch goes through a device staging buffer so that each host copy is one
contiguous transfer per block (or per run of adjacent slots):

    store: pool --gather (side stream)--> stage --D2H--> pinned slots
    load:  pinned slots --H2D (side stream)--> stage half --scatter (scatter stream)--> pool

A load alternates between the stage's two halves, so the scatter of one chunk runs
beside the H2D of the next; a half is refilled only after its scatter has finished.

Every call runs on the KV mover thread and returns when its copies are complete, so
the caller may publish slots or hand blocks to the scheduler right after. On CPU the
copies are direct. `after` (a CUDA event recorded on the compute stream) orders a
store behind the step that computed the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strata.kv.cache import KVCache
from strata.kv.codec import BlockCodec
from strata.kv.tiers.slot_codec import RECODE_BYTES, SlotCodec

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
    def __init__(self, kv: KVCache, slab: torch.Tensor, codec: BlockCodec | None = None) -> None:
        """`codec`: the slots' codec when it is not the pool's (a tier codec)."""
        self.kv = kv
        self.slab = slab
        self.device = kv.device
        self.rows = SlotCodec(kv, codec)
        self.block_shape = (kv.num_layers, self.rows.row_bytes)
        self.block_bytes = slab.shape[1]
        if self.block_bytes != kv.num_layers * self.rows.row_bytes:
            raise ValueError(
                f"tier slots hold {self.block_bytes} bytes, a block "
                f"{kv.num_layers * self.rows.row_bytes}"
            )
        self.cuda = self.device.type == "cuda"
        per_block, budget = (
            (self.rows.recode_bytes, RECODE_BYTES) if self.rows.recode
            else (self.block_bytes, STAGE_BYTES)
        )  # fmt: skip
        # on CUDA at least 2: a load alternates between the stage's halves
        least = 2 if self.cuda else 1
        capped = self.cuda or self.rows.recode
        self.chunk = max(least, min(256, budget // per_block)) if capped else 256
        if self.cuda:
            self.stage = torch.empty(
                (self.chunk, *self.block_shape), dtype=torch.uint8, device=self.device
            )
            self.stream = torch.cuda.Stream(self.device)
            self.scatter_stream = torch.cuda.Stream(self.device)
            # per stage half: its H2D landed / its scatter finished (the half is free)
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]
            self.scattered = [torch.cuda.Event(), torch.cuda.Event()]

    def _slot(self, slot: int) -> torch.Tensor:
        return self.slab[slot].view(self.block_shape)

    def _index(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)

    # ---- pool -> slots --------------------------------------------------------------------

    def store(
        self, block_ids: Sequence[int], slots: Sequence[int], after: torch.cuda.Event | None
    ) -> None:
        for lo in range(0, len(block_ids), self.chunk):
            ids, dst = block_ids[lo : lo + self.chunk], slots[lo : lo + self.chunk]
            if self.cuda:
                self._store_cuda(ids, dst, after)
            else:
                self._store_cpu(ids, dst)

    def _store_cpu(self, ids: Sequence[int], slots: Sequence[int]) -> None:
        if self.rows.recode:
            rows = torch.empty((len(ids), *self.block_shape), dtype=torch.uint8)
            self.rows.gather(self._index(ids), rows)
            for start, first, length in _runs(slots):
                self.slab[first : first + length].copy_(rows[start : start + length].flatten(1))
            return
        for block_id, slot in zip(ids, slots, strict=True):  # direct: faster than batched on CPU
            out = self._slot(slot)
            for part, (a, b) in zip(self.rows.part_bytes, self.rows.columns, strict=True):
                out[:, a:b].copy_(part[:, block_id])

    def _store_cuda(
        self, ids: Sequence[int], slots: Sequence[int], after: torch.cuda.Event | None
    ) -> None:
        n = len(ids)
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            stage = self.stage[:n]
            self.rows.gather(self._index(ids), stage)
            flat = stage.view(n, -1)
            for start, first, length in _runs(slots):
                self.slab[first : first + length].copy_(
                    flat[start : start + length], non_blocking=True
                )
        self.stream.synchronize()

    # ---- slots -> pool --------------------------------------------------------------------

    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        if self.cuda:
            self._load_cuda(slots, block_ids)
            return
        for lo in range(0, len(block_ids), self.chunk):
            self._load_cpu(slots[lo : lo + self.chunk], block_ids[lo : lo + self.chunk])

    def _load_cpu(self, slots: Sequence[int], ids: Sequence[int]) -> None:
        if self.rows.recode:  # runs of slots: index_select of uint8 rows is slow on CPU
            rows = torch.empty((len(slots), *self.block_shape), dtype=torch.uint8)
            for start, first, length in _runs(slots):
                rows[start : start + length].flatten(1).copy_(self.slab[first : first + length])
            self.rows.scatter(rows, self._index(ids))
            return
        for slot, block_id in zip(slots, ids, strict=True):
            block = self._slot(slot)
            for part, (a, b) in zip(self.rows.part_bytes, self.rows.columns, strict=True):
                part[:, block_id].copy_(block[:, a:b])

    def _load_cuda(self, slots: Sequence[int], ids: Sequence[int]) -> None:
        half = self.chunk // 2
        for i, lo in enumerate(range(0, len(ids), half)):
            src, dst = slots[lo : lo + half], ids[lo : lo + half]
            n, h = len(dst), i % 2
            stage = self.stage[h * half : h * half + n]
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.scattered[h])  # the half's last scatter is done
                flat = stage.view(n, -1)
                for start, first, length in _runs(src):
                    flat[start : start + length].copy_(
                        self.slab[first : first + length], non_blocking=True
                    )
                self.copied[h].record(self.stream)
            with torch.cuda.stream(self.scatter_stream):
                self.scatter_stream.wait_event(self.copied[h])
                self.rows.scatter(stage, self._index(dst))  # index made on this stream
                self.scattered[h].record(self.scatter_stream)
        self.scatter_stream.synchronize()
