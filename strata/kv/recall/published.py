"""PublishedBlocks: the recall store's prefix index, full prompt blocks by content.

A published block is one full prompt block whose keys and values, in every layer, sit
in two host slots (host_store.py) under its chained block key (strata/kv/prefix.py: the
key of the GPU prefix cache, salted per partition):

    key -> PublishedBlock(key, token_ids, key_slot, value_slot)
    slot -> the block it belongs to

A lookup compares the stored token ids as well, so a hash collision can never hand out
another prompt's KV. A sequence reusing a block holds references on its two slots; the
store keeps a published slot's contents unchanged for as long as it is indexed.

Invariants (`check`): the two maps agree; a slot belongs to at most one block; a
block's key slot and value slot differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from strata.kv.prefix import BlockRef


@dataclass(frozen=True)
class PublishedBlock:
    key: bytes
    token_ids: tuple[int, ...]
    key_slot: int
    value_slot: int

    @property
    def slots(self) -> tuple[int, int]:
        return self.key_slot, self.value_slot


class PublishedBlocks:
    def __init__(self) -> None:
        self._by_key: dict[bytes, PublishedBlock] = {}
        self._by_slot: dict[int, PublishedBlock] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[PublishedBlock]:
        return iter(self._by_key.values())

    def lookup(self, ref: BlockRef) -> PublishedBlock | None:
        """The block published under ref's key holding exactly its tokens, or None."""
        block = self._by_key.get(ref.key)
        return block if block is not None and block.token_ids == ref.token_ids else None

    def leading(self, refs: Sequence[BlockRef]) -> list[PublishedBlock]:
        """The published blocks of the longest run of leading `refs` found."""
        found = []
        for ref in refs:
            block = self.lookup(ref)
            if block is None:
                break
            found.append(block)
        return found

    def add(self, block: PublishedBlock) -> bool:
        """Index a block; False (and no change) if its key or either slot is indexed."""
        taken = block.key in self._by_key or any(s in self._by_slot for s in block.slots)
        if taken or block.key_slot == block.value_slot:
            return False
        self._by_key[block.key] = block
        for slot in block.slots:
            self._by_slot[slot] = block
        return True

    def block_of(self, slot: int) -> PublishedBlock | None:
        return self._by_slot.get(slot)

    def forget(self, slot: int) -> PublishedBlock | None:
        """Drop the block `slot` belongs to (its contents are about to change); it."""
        block = self._by_slot.get(slot)
        if block is None:
            return None
        del self._by_key[block.key]
        for s in block.slots:
            del self._by_slot[s]
        return block

    def check(self) -> list[str]:
        """Problems with the two maps' agreement (empty when consistent)."""
        problems = []
        if 2 * len(self._by_key) != len(self._by_slot):
            problems.append(
                f"recall prefix index: {len(self._by_key)} blocks but {len(self._by_slot)} slots"
            )
        for key, block in self._by_key.items():
            if block.key != key or any(self._by_slot.get(s) is not block for s in block.slots):
                problems.append(f"recall prefix index: block {key.hex()[:12]} mismatched")
        return problems
