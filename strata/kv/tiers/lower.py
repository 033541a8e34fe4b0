"""The tiers below the cpu tier (disk, remote), read and written through the cpu tier.

    write:  cpu slot (pinned by the caller) --put--> each lower tier that lacks the block
    read:   first lower tier holding the block --get_into a reserved cpu slot, verify
            tokens and scales--> published, pinned, and promoted into the lower tiers
            above it

A coded block (a lossy pool or tier codec) enters the cpu tier only with every scale and
zero finite (slot_codec.stored_block_problem): the cpu tier holds blocks this engine
coded itself or ones checked on the way in, and the mover decodes them unchecked.

Runs on the TierManager's io thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from strata.kv.prefix import BlockRef
from strata.kv.tiers.base import StoredBlock, TierStore
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.slot_codec import stored_block_problem

logger = logging.getLogger("strata.kv.tiers")


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
        return StoredBlock(block.key, block.token_ids, self.cpu.slab[slot], block.position)

    def read(self, blocks: Sequence[BlockRef]) -> list[bytes]:
        """Read these blocks from the lower tiers into the cpu tier, pinned; their keys.

        Batched `get_into` calls per tier for the keys still missing, each block read
        straight into a reserved cpu slot; a hit in one tier is also promoted into the
        lower tiers above it. Stops early when every cpu slot is pinned.
        """
        pinned: list[bytes] = []
        missing = {b.key: b for b in blocks}
        for depth, tier in enumerate(self.tiers):
            wanted = list(missing.values())
            for lo in range(0, len(wanted), tier.read_batch):
                asked = wanted[lo : lo + tier.read_batch]
                slots = self._reserve(len(asked))
                batch = asked[: len(slots)]
                got = tier.get_into([b.key for b in batch], [self.cpu.slab[s] for s in slots])
                for block, slot, found in zip(batch, slots, got, strict=True):
                    if self._accept(tier, block, found):
                        self.cpu.publish(block.key, block.token_ids, slot, block.position)
                        pinned.extend(self.cpu.pin_present([block.key]))
                        payload = self.cpu.slab[slot]
                        for above in self.tiers[:depth]:
                            above.put([StoredBlock(block.key, block.token_ids, payload,
                                                   block.position)])  # fmt: skip
                        del missing[block.key]
                    else:
                        self.cpu.release_slot(slot)
                if len(slots) < len(asked):
                    return pinned  # the cpu tier is full of pinned blocks
        return pinned

    def _reserve(self, n: int) -> list[int]:
        """Up to `n` reserved cpu slots (fewer when the rest are pinned)."""
        slots: list[int] = []
        while len(slots) < n and (slot := self.cpu.reserve()) is not None:
            slots.append(slot)
        return slots

    def _accept(self, tier: TierStore, block: BlockRef, found: StoredBlock | None) -> bool:
        """Whether a tier's answer is the block asked for and may be decoded (one that is
        not is removed there; bad scales also count as corrupt)."""
        if found is None:
            return False
        problem = None
        if found.token_ids != block.token_ids:
            problem = "holds other tokens"
        elif (problem := stored_block_problem(self.cpu.layout, found.payload)) is not None:
            tier.stats.add(corrupt=1)
        if problem is not None:
            logger.warning("%s tier: block %s %s; ignored", tier.name, block.key.hex()[:12],
                           problem)  # fmt: skip
            tier.remove([block.key])
            return False
        return True
