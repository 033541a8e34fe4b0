"""Eviction orders for tiers, selected by name. A tier tells the order about every
insert (with the block's position in its prefix, when known), access and removal, and
asks it for the next unpinned victim.

    lru   least recently inserted or accessed first
    fifo  oldest insert first
    cost  lowest value first, the GPU pool's value model (strata/kv/keep_value.py):
          L + uses * (1 + slope * position), set at insert and again at each access;
          uses = 1 + accesses, L = the highest value evicted so far. A block of
          unknown position (one a restarted disk tier found on disk) counts as position 0.
          Equal values leave in the order they were set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from strata.kv.keep_value import keep_value
from strata.kv.lazy_heap import LazyHeap
from strata.registry import Registry


class EvictionOrder:
    """Keys from the first to evict to the last: insertion order, where an access moves
    the key to the back if `refresh_on_access`. Subclasses are the named orders.

    slope: recompute cost per block before a block (attention_slope); only cost uses it.
    """

    refresh_on_access = False

    def __init__(self, slope: float = 0.0) -> None:
        if slope < 0:
            raise ValueError(f"the recompute cost slope must be >= 0, got {slope}")
        self.slope = slope
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def inserted(self, key: bytes, position: int | None = None) -> None:
        """`key` is stored; `position`: its block's index in its prefix (None: unknown)."""
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: bytes) -> None:
        if self.refresh_on_access and key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._order)  # callers must not mutate while iterating

    def victim(self, is_pinned: Callable[[bytes], bool]) -> bytes | None:
        return next((k for k in self.candidates() if not is_pinned(k)), None)


class LRUOrder(EvictionOrder):
    """Least recently inserted or accessed first."""

    refresh_on_access = True


class FIFOOrder(EvictionOrder):
    """Oldest insert first; accesses do not refresh."""


class CostOrder(EvictionOrder):
    """Hit likelihood x recompute cost, aged (see the module docstring). `_values` holds
    exactly the stored keys."""

    def __init__(self, slope: float = 0.0) -> None:
        super().__init__(slope)
        self.inflation = 0.0  # L
        self._position: dict[bytes, int] = {}
        self._uses: dict[bytes, int] = {}
        self._values: LazyHeap[bytes] = LazyHeap()

    def inserted(self, key: bytes, position: int | None = None) -> None:
        self._position[key] = position or 0
        self._uses[key] = 1
        self._values.push(key, self.value(key))

    def accessed(self, key: bytes) -> None:
        if key in self._values:
            self._uses[key] += 1
            self._values.push(key, self.value(key))

    def removed(self, key: bytes) -> None:
        self._position.pop(key, None)
        self._uses.pop(key, None)
        self._values.discard(key)

    def value(self, key: bytes) -> float:
        return keep_value(self.inflation, self._uses[key], self._position[key], self.slope)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._values.sorted_keys())

    def victim(self, is_pinned: Callable[[bytes], bool]) -> bytes | None:
        """The lowest-valued unpinned key; L rises to its value (the caller evicts it). A
        pinned key skipped meanwhile may be worth less than L: L never falls."""
        lowest = self._values.lowest(skip=is_pinned)
        if lowest is None:
            return None
        value, key = lowest
        self.inflation = max(self.inflation, value)
        return key


EVICTION_ORDERS: Registry[type[EvictionOrder]] = Registry(
    "tier eviction order", {"lru": LRUOrder, "fifo": FIFOOrder, "cost": CostOrder}
)


def make_eviction_order(name: str, slope: float = 0.0) -> EvictionOrder:
    return EVICTION_ORDERS.get(name)(slope)
