"""BlockIndex: the router's copy of every replica's prefix-index keys, kept by events.

Invariant: after `apply(r, batch)` for every batch replica r published, in order, the
keys held for r equal the keys in r's own PrefixIndex. A batch from a new incarnation
(the replica restarted, its cache empty) first clears what was held for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from strata.kv.index_events import STORED, IndexEvent


class BlockIndex:
    def __init__(self, num_replicas: int) -> None:
        self._keys: list[set[bytes]] = [set() for _ in range(num_replicas)]
        self._incarnation: list[str | None] = [None] * num_replicas

    def apply(self, replica: int, incarnation: str, events: Sequence[IndexEvent]) -> None:
        if incarnation != self._incarnation[replica]:
            self._keys[replica].clear()
            self._incarnation[replica] = incarnation
        keys = self._keys[replica]
        for kind, key in events:
            if kind == STORED:
                keys.add(key)
            else:
                keys.discard(key)

    def keys_of(self, replica: int) -> frozenset[bytes]:
        return frozenset(self._keys[replica])

    def prefix_blocks(self, replica: int, keys: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt (its chained keys) the replica holds.
        A chained key names its whole prefix, so the first miss ends the match."""
        held = self._keys[replica]
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count
