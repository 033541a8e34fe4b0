"""The tiers below the cpu tier (disk, remote), read and written through the cpu tier.

    write:  cpu slot (pinned by the caller) --put--> each lower tier that lacks the block
    read:   first lower tier holding the block --get, verify tokens and scales--> new cpu
            slot, pinned and promoted into the lower tiers above the one that held it

A coded block (a lossy pool or tier codec) enters the cpu tier only with every scale and
zero finite (slot_codec.stored_block_problem): the cpu tier holds blocks this engine
coded itself or ones checked on the way in, and the mover decodes them unchecked.

Runs on the TierManager's io thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from strata.kv.prefix import BlockRef
from strata.kv.tiers.base import StoredBlock, TierStore
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.slot_codec import stored_block_problem

logger = logging.getLogger("strata.kv.tiers")

# Blocks per lower-tier read call. On an H200 host, Redis on loopback gave 1.2 GB/s with
# one GET per 2 MiB block but 0.5 GB/s with one MGET per 64-block part (the client
# parses a huge reply slowly), so reads go in small batches.
READ_BATCH = 8


class LowerTiers:
    def __init__(self, cpu: CPUTier, tiers: Sequence[TierStore]) -> None:
        self.cpu = cpu
        self.tiers = list(tiers)

    def write(self, blocks: Sequence[BlockRef]) -> None:
        """Put the blocks still in the cpu tier into every lower tier that lacks them."""
        stored = [b for b in blocks if self.cpu.slot_of(b.key) is not None]
        for tier in self.tiers:
            missing = [b for b, p in zip(stored, tier.contains([b.key for b in stored]),
                                         strict=True) if not p]  # fmt: skip
            if missing:
                tier.put([self._cpu_block(b) for b in missing])

    def _cpu_block(self, block: BlockRef) -> StoredBlock:
        slot = self.cpu.slot_of(block.key)
        assert slot is not None  # pinned by the caller
        return StoredBlock(block.key, block.token_ids, self.cpu.slab[slot])

    def read(self, blocks: Sequence[BlockRef]) -> list[bytes]:
        """Read these blocks from the lower tiers into the cpu tier, pinned; their keys.

        One batched `get` per tier for the keys still missing; a hit in one tier is also
        promoted into the lower tiers above it.
        """
        pinned: list[bytes] = []
        missing = {b.key: b for b in blocks}
        for depth, tier in enumerate(self.tiers):
            if not missing:
                break
            wanted = list(missing.values())
            for block, got in _get_batched(tier, wanted):
                if got is None:
                    continue
                problem = self._problem(tier, block, got)
                if problem is not None:
                    logger.warning("%s tier: block %s %s; ignored", tier.name,
                                   block.key.hex()[:12], problem)  # fmt: skip
                    tier.remove([block.key])
                    continue
                slot = self.cpu.reserve()
                if slot is None:
                    return pinned
                self.cpu.slab[slot].copy_(got.payload.reshape(-1))
                self.cpu.publish(block.key, block.token_ids, slot)
                pinned.extend(self.cpu.pin_present([block.key]))
                for above in self.tiers[:depth]:
                    above.put([got])
                del missing[block.key]
        return pinned

    def _problem(self, tier: TierStore, block: BlockRef, got: StoredBlock) -> str | None:
        """Why a block a tier returned must not be used (a bad one also counts as corrupt)."""
        if got.token_ids != block.token_ids:
            return "holds other tokens"
        problem = stored_block_problem(self.cpu.layout, got.payload)
        if problem is not None:
            tier.stats.add(corrupt=1)
        return problem


def _get_batched(
    tier: TierStore, blocks: list[BlockRef]
) -> Iterator[tuple[BlockRef, StoredBlock | None]]:
    """`tier.get` in batches of READ_BATCH blocks; each result is valid until the next."""
    for lo in range(0, len(blocks), READ_BATCH):
        batch = blocks[lo : lo + READ_BATCH]
        yield from zip(batch, tier.get([b.key for b in batch]), strict=True)
