"""BlockCache: one simulated replica's KV blocks — in use, cached for reuse, or free.

    capacity = in use (keyed, refcount > 0) + in use (anonymous) + cached (LRU) + free

A keyed block holds a full block of some prompt (its chained key names the whole prefix
before it); an anonymous one holds a partial block or a duplicate of a keyed one. Blocks a
finished request releases stay cached, keyed, until a new allocation evicts them, oldest
first; a request's tail blocks are released as older than its head, so a shared head
outlives the tails hung on it, as in the engine's free list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

Key = int
Listener = Callable[[Key, bool], None]  # (key, stored: True | forgotten: False)


class BlockCache:
    def __init__(self, capacity: int, listener: Listener | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"a replica needs at least 1 KV block, got {capacity}")
        self.capacity = capacity
        self.listener = listener  # told of every key the cache starts or stops holding
        self._refs: dict[Key, int] = {}  # keyed blocks in use
        self._lru: OrderedDict[Key, None] = OrderedDict()  # cached, unused: oldest first
        self.anonymous = 0
        self.evictions = 0

    @property
    def used(self) -> int:
        return len(self._refs) + self.anonymous

    @property
    def free(self) -> int:
        return self.capacity - self.used - len(self._lru)

    def holds(self, key: Key) -> bool:
        return key in self._refs or key in self._lru

    def match(self, keys: Sequence[Key]) -> int:
        """How many leading keys are cached or in use here (the first miss ends a chain)."""
        count = 0
        for key in keys:
            if not self.holds(key):
                break
            count += 1
        return count

    def can_allocate(self, blocks: int, reusing: Sequence[Key] = ()) -> bool:
        """Whether `blocks` new blocks fit once `reusing` (matched keys) are acquired:
        a cached block taken back for reuse can no longer be evicted for room."""
        taken = sum(1 for key in reusing if key in self._lru)
        return blocks <= self.free + len(self._lru) - taken

    def acquire(self, keys: Sequence[Key]) -> None:
        """Take a reference on blocks `match` found: cached ones leave the LRU."""
        for key in keys:
            if key in self._lru:
                del self._lru[key]
                self._refs[key] = 1
            else:
                self._refs[key] += 1

    def allocate(self, blocks: int) -> list[Key]:
        """`blocks` anonymous blocks, evicting cached ones oldest first; the evicted keys."""
        if not self.can_allocate(blocks):
            raise ValueError(f"{blocks} blocks asked, {self.free + len(self._lru)} available")
        evicted = []
        while self.free < blocks:
            key, _ = self._lru.popitem(last=False)
            evicted.append(key)
            if self.listener is not None:
                self.listener(key, False)
        self.evictions += len(evicted)
        self.anonymous += blocks
        return evicted

    def register(self, key: Key) -> bool:
        """An anonymous block of a request now holds `key`; False if another block already
        does (the block stays anonymous: a duplicate, freed with its request)."""
        if self.holds(key):
            return False
        self.anonymous -= 1
        self._refs[key] = 1
        if self.listener is not None:
            self.listener(key, True)
        return True

    def release(self, keys: Sequence[Key], anonymous: int) -> None:
        """A request's references, its blocks in prompt order, and its anonymous blocks."""
        for key in reversed(keys):  # tail first: evicted before the head
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                self._lru[key] = None
        self.anonymous -= anonymous

    def check_integrity(self) -> None:
        if self.anonymous < 0 or self.free < 0:
            raise AssertionError(f"blocks: {self.anonymous} anonymous, {self.free} free")
        if any(n <= 0 for n in self._refs.values()):
            raise AssertionError("a keyed block in use has no reference")
        if self._refs.keys() & self._lru.keys():
            raise AssertionError("a block is both in use and cached")
