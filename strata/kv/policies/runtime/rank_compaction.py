"""A compaction under tensor parallelism: rank 0 decides, every rank moves its own heads.

Rank 0's policy selects over every KV head (its scores gathered, gathered.py) and rank 0
changes the block table (KVManager.compact_table). The other ranks hold no tables: rank
0 sends them the table change and the keep masks as a `CompactOp`, on the step channel
before the next step, and each rank moves the rows of the masks that are its heads
(`RankShard.heads`). Every rank then holds the same blocks, and each head the same
tokens, as a single rank would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from strata.kv.cache import KVCache
from strata.kv.policies.runtime.compaction import TableChange, move_slots


@dataclass(frozen=True)
class CompactOp:
    """One sequence's compaction; masks[l] is [kv_heads, n_l] bool, bit-packed on the
    last dim (np.packbits)."""

    change: TableChange
    keep: tuple[int, ...]
    masks: tuple[np.ndarray, ...]
    num_slots: tuple[int, ...]

    @classmethod
    def of(cls, change: TableChange, masks: list[torch.Tensor], keep: list[int]) -> CompactOp:
        packed = tuple(np.packbits(m.cpu().numpy(), axis=-1) for m in masks)
        return cls(change, tuple(keep), packed, tuple(int(m.shape[-1]) for m in masks))

    def unpacked(self, device: torch.device) -> list[torch.Tensor]:
        return [
            torch.from_numpy(np.unpackbits(m, axis=-1, count=n).astype(bool)).to(device)
            for m, n in zip(self.masks, self.num_slots, strict=True)
        ]


class CompactionPeers(Protocol):
    """The other ranks, as rank 0's policy driver sees them (strata/engine/tp)."""

    def send(self, op: CompactOp) -> None:
        """Queue `op` for every other rank, after everything sent before it."""


@dataclass(frozen=True)
class RankShard:
    """Where this rank's KV heads sit among the model's, and the other ranks (rank 0)."""

    heads: slice
    peers: CompactionPeers | None = None


def apply_compact_op(cache: KVCache, op: CompactOp, heads: slice) -> None:
    """A worker's side of rank 0's compaction: move its own heads' kept slots."""
    masks = [m[heads] for m in op.unpacked(cache.k.device)]
    move_slots(cache, op.change, masks, list(op.keep))
