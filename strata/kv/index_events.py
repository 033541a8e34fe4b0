"""Events of a prefix index: which block keys it stores and evicts, in order.

A replica behind a KV-aware router publishes these so the router's copy of its key set
is exact: replaying every event in order onto an empty set gives `index.items()` keys.
`observe_index` swaps a KVManager's index for an observed one holding the same entries;
nothing else in the engine changes (the manager reaches its index only as `kv.index`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from strata.kv.manager import KVManager
from strata.kv.prefix import PrefixIndex

STORED, EVICTED = "+", "-"
IndexEvent = tuple[str, bytes]  # (STORED | EVICTED, block key)


class IndexEvents:
    """Events since the last `drain`, appended by the engine thread, drained by another."""

    def __init__(self) -> None:
        self._events: list[IndexEvent] = []
        self._lock = threading.Lock()

    def add(self, kind: str, key: bytes) -> None:
        with self._lock:
            self._events.append((kind, key))

    def drain(self) -> list[IndexEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


class ObservedPrefixIndex(PrefixIndex):
    """A PrefixIndex that reports each key it stores or forgets to `events`."""

    def __init__(self, events: IndexEvents) -> None:
        super().__init__()
        self.events = events

    def insert(self, key: bytes, token_ids: Sequence[int], block_id: int) -> bool:
        inserted = super().insert(key, token_ids, block_id)
        if inserted:
            self.events.add(STORED, key)
        return inserted

    def remove_block(self, block_id: int) -> bytes | None:
        key = super().remove_block(block_id)
        if key is not None:
            self.events.add(EVICTED, key)
        return key


def observe_index(kv: KVManager, events: IndexEvents) -> ObservedPrefixIndex:
    """Replace `kv.index` by an observed copy; its current keys are reported as stored.
    Call it while nothing steps the engine (before the first request)."""
    observed = ObservedPrefixIndex(events)
    old = kv.index
    for key, block_id in old.items():
        entry = old._entry_of[block_id]
        observed.insert(key, entry[1], block_id)
    kv.index = observed
    return observed
