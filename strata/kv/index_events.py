"""Events of a prefix index: which block keys it stores and evicts, in order.

A replica behind a KV-aware router publishes these so the router's copy of its key set
is exact: replaying every event in order onto an empty set gives `index.items()` keys.
`observe_index` makes IndexEvents the listener of a KVManager's index (PrefixIndex tells
its listener of every key it stores or forgets).
"""

from __future__ import annotations

import threading

from strata.kv.manager import KVManager

STORED, EVICTED = "+", "-"
IndexEvent = tuple[str, bytes]  # (STORED | EVICTED, block key)


class IndexEvents:
    """Events since the last `drain`, appended by the engine thread, drained by another
    (an IndexListener)."""

    def __init__(self) -> None:
        self._events: list[IndexEvent] = []
        self._lock = threading.Lock()

    def add(self, kind: str, key: bytes) -> None:
        with self._lock:
            self._events.append((kind, key))

    def stored(self, key: bytes) -> None:
        self.add(STORED, key)

    def evicted(self, key: bytes) -> None:
        self.add(EVICTED, key)

    def drain(self) -> list[IndexEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


def observe_index(kv: KVManager, events: IndexEvents) -> None:
    """Report `kv.index`'s keys as stored, then every change to `events`. Call it while
    nothing steps the engine (before the first request)."""
    for key, _ in kv.index.items():
        events.stored(key)
    kv.index.listener = events
