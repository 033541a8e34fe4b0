"""LazyHeap: keys ordered by a value, lowest first, for the cost-aware eviction orders
(pool_order.py, tiers/eviction.py).

Invariant: `_entry` holds exactly the keys in the heap, each with the (value, stamp) of
its one live heap entry. Pushing a key again, or discarding it, leaves its old entry
stale (its stamp differs); stale entries are skipped when they reach the top, and the
heap is rebuilt from `_entry` once they outnumber the live ones. Equal values come out
in the order they were pushed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LazyHeap(Generic[K]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._entry: dict[K, tuple[float, int]] = {}
        self._stamp = 0

    def __contains__(self, key: K) -> bool:
        return key in self._entry

    def __iter__(self) -> Iterator[K]:
        return iter(self._entry)

    def push(self, key: K, value: float) -> None:
        """Set the key's value (its entry replaces any earlier one)."""
        self._stamp += 1
        entry = (value, self._stamp)
        self._entry[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self._entry) + 64:  # drop stale entries
            self._heap = [(*e, k) for k, e in self._entry.items()]
            heapq.heapify(self._heap)

    def discard(self, key: K) -> bool:
        """Take the key out; False if it was not in."""
        return self._entry.pop(key, None) is not None

    def sorted_keys(self) -> list[K]:
        """Every key, lowest value first."""
        return sorted(self._entry, key=self._entry.__getitem__)

    def lowest(self, skip: Callable[[K], bool] | None = None) -> tuple[float, K] | None:
        """The lowest (value, key) whose key `skip` does not refuse, left in the heap;
        None if there is none."""
        heap, skipped, found = self._heap, [], None
        while heap and found is None:
            value, stamp, key = heap[0]
            live = self._entry.get(key)
            if live is None or live[1] != stamp:
                heapq.heappop(heap)
            elif skip is not None and skip(key):
                skipped.append(heapq.heappop(heap))
            else:
                found = (value, key)
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found
