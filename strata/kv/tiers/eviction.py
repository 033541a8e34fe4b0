"""Eviction orders for tiers, selected by name. A tier tells the order about every
insert, access and removal, and asks it for the next unpinned victim."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from strata.registry import Registry


class EvictionOrder:
    """Keys from the first to evict to the last: insertion order, where an access moves
    the key to the back if `refresh_on_access`. Subclasses are the named orders."""

    refresh_on_access = False

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def inserted(self, key: bytes) -> None:
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


EVICTION_ORDERS: Registry[type[EvictionOrder]] = Registry(
    "tier eviction order", {"lru": LRUOrder, "fifo": FIFOOrder}
)


def make_eviction_order(name: str) -> EvictionOrder:
    return EVICTION_ORDERS.get(name)()
