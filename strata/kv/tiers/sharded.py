"""ShardedTierManager: rank 0's TierManager under tensor parallelism.

It is a TierManager over rank 0's own tiers that also sends every store, load, hold,
release and flush to the other ranks (tier_ops.py), and reports a load as landed only
once every rank has answered it: a load lands with the fewest leading blocks any rank
loaded. A block that one rank lacks, or holds corrupt (a checksum miss there), is thus
recomputed on every rank, and the block tables and prefix index stay rank 0's alone.
Blocks rank 0 loaded beyond that count stay unindexed in its table and are overwritten
by the recomputation, like the tail of any partial load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from strata.kv.cache import KVCache
from strata.kv.prefix import BlockRef
from strata.kv.tiers.base import TierStore
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.jobs import LoadDone, TierEvent
from strata.kv.tiers.manager import TierManager
from strata.kv.tiers.tier_ops import (
    FlushOp,
    HoldOp,
    LoadOp,
    ReleaseOp,
    StoreOp,
    TierPeers,
    reply_key,
)


class ShardedTierManager(TierManager):
    def __init__(
        self, kv_cache: KVCache, cpu: CPUTier, lower: Sequence[TierStore], peers: TierPeers
    ) -> None:
        super().__init__(kv_cache, cpu, lower)
        self.peers = peers
        self.num_rank_short_loads = 0  # loads where another rank had fewer blocks

    def store(
        self, blocks: Sequence[BlockRef], block_ids: Sequence[int], after: Any = None
    ) -> None:
        super().store(blocks, block_ids, after)
        if blocks:
            self.peers.send(StoreOp(tuple(blocks), tuple(block_ids)))

    def start_load(self, seq_id: str, blocks: Sequence[BlockRef], block_ids: Sequence[int]) -> None:
        super().start_load(seq_id, blocks, block_ids)
        self.peers.send(LoadOp(seq_id, tuple(blocks), tuple(block_ids)))

    def hold(self, owner: str, keys: Sequence[bytes]) -> None:
        super().hold(owner, keys)
        self.peers.send(HoldOp(owner, tuple(keys)))

    def release(self, owner: str) -> None:
        super().release(owner)
        self.peers.send(ReleaseOp(owner))

    def poll(self) -> list[TierEvent]:
        """Rank 0's completed loads and probes; a load's count is the least any rank got."""
        out: list[TierEvent] = []
        for event in super().poll():
            if isinstance(event, LoadDone):
                op = LoadOp(event.seq_id, (), ())
                least = min(event.num_loaded, *self.peers.replies(str(reply_key(op))))
                if least < event.num_loaded:
                    self.num_rank_short_loads += 1
                    event = LoadDone(event.seq_id, least)
            out.append(event)
        return out

    def flush(self) -> None:
        super().flush()
        flush = FlushOp()
        self.peers.send(flush)
        self.peers.replies(str(reply_key(flush)))

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "kv_tier_rank_short_loads": self.num_rank_short_loads}
