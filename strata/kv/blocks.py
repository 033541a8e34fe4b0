"""A fixed set of KV block ids with reference counts and an ordered free list.

Free list order is eviction order: `allocate` takes the front, `release` appends at the
back. A released block keeps its contents (and its prefix key, held by the PrefixIndex)
until `allocate` hands it out again, so a prefix hit can revive it with `acquire`.

    free list:  front [least recently released ... most recently released] back
                  ^ allocate() pops here               release() appends here ^

That is the lru order; another `FreeBlockOrder` (pool_order.py) may choose any free block,
and the list then only records release order.
"""

from __future__ import annotations

from collections import OrderedDict

from strata.kv.pool_order import FreeBlockOrder, LRUFreeOrder


class BlockPool:
    """Reference counts and the ordered free list of `num_blocks` block ids."""

    def __init__(self, num_blocks: int, order: FreeBlockOrder | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.order = order or LRUFreeOrder()
        self.refcount: list[int] = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Free blocks lent to another user of the memory (MoE expert slots): never allocated.
        self.withdrawn: set[int] = set()
        for block_id in self._free:
            self.order.freed(block_id)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_order(self) -> list[int]:
        """Free block ids, the next to be allocated first."""
        return list(self._free)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def allocate(self) -> int:
        """Take the block the order picks (lru: the least recently released); the caller
        owns one reference."""
        if not self._free:
            raise RuntimeError("BlockPool.allocate called with no free block")
        block_id = self.order.victim(self._free)
        self._take(block_id)
        self.refcount[block_id] = 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """Add a reference to a block, taking it off the free list if it was there."""
        if self.refcount[block_id] == 0:
            self._take(block_id)
        self.refcount[block_id] += 1

    def _take(self, block_id: int) -> None:
        del self._free[block_id]
        self.order.taken(block_id)

    def release(self, block_id: int) -> None:
        """Drop a reference; at zero the block goes to the back of the free list."""
        if self.refcount[block_id] <= 0:
            raise RuntimeError(f"block {block_id} released more often than acquired")
        self.refcount[block_id] -= 1
        if self.refcount[block_id] == 0:
            self._free[block_id] = None
            self.order.freed(block_id)

    def withdraw(self, block_id: int) -> None:
        """Take a free block out of circulation (its memory is lent, e.g. to expert slots)."""
        if block_id not in self._free:
            raise RuntimeError(f"block {block_id} is not free: it cannot be withdrawn")
        self._take(block_id)
        self.withdrawn.add(block_id)

    def restore(self, block_id: int) -> None:
        """Return a withdrawn block; it holds nothing, so it is allocated first."""
        self.withdrawn.remove(block_id)
        self._free[block_id] = None
        self._free.move_to_end(block_id, last=False)
        self.order.freed(block_id)
