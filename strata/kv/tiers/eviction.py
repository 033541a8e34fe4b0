"""Eviction orders for tiers, selected by name. A tier tells the order about every
insert, access and removal, and asks it for the next unpinned victim."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator

from strata.registry import Registry


class EvictionOrder(ABC):
    @abstractmethod
    def inserted(self, key: bytes) -> None: ...

    @abstractmethod
    def accessed(self, key: bytes) -> None: ...

    @abstractmethod
    def removed(self, key: bytes) -> None: ...

    @abstractmethod
    def candidates(self) -> Iterator[bytes]:
        """Keys from the first to evict to the last."""

    def victim(self, is_pinned: Callable[[bytes], bool]) -> bytes | None:
        return next((k for k in self.candidates() if not is_pinned(k)), None)


class LRUOrder(EvictionOrder):
    """Least recently inserted or accessed first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def inserted(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._order)  # callers must not mutate while iterating


class FIFOOrder(LRUOrder):
    """Oldest insert first; accesses do not refresh."""

    def accessed(self, key: bytes) -> None:
        return None


EVICTION_ORDERS: Registry[type[EvictionOrder]] = Registry(
    "tier eviction order", {"lru": LRUOrder, "fifo": FIFOOrder}
)


def make_eviction_order(name: str) -> EvictionOrder:
    return EVICTION_ORDERS.get(name)()
