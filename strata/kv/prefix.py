"""Block keys and the prefix index.

A block key is a chained SHA-256:

    root     = sha256("strata-kv/1" | model fingerprint | KV layout)
               then, for a salted request (tenant, cache_salt), sha256(root | salt)
    key(i)   = sha256(key(i-1) | token ids of block i as little-endian int64)

so a key names the whole prefix up to and including its block, is the same in every
process and on every machine, and differs for another model, dtype or block size.
The index maps keys of full, computed blocks to the block ids holding them. A lookup
compares the stored token ids as well, so a hash collision can never return wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

KEY_FORMAT = b"strata-kv/1"


def root_key(model_fingerprint: str, kv_layout: str) -> bytes:
    """The key every chain starts from: model identity and KV layout, nothing else."""
    h = hashlib.sha256(KEY_FORMAT)
    h.update(b"\0" + model_fingerprint.encode() + b"\0" + kv_layout.encode())
    return h.digest()


def salted_root(root: bytes, salt: str | None) -> bytes:
    """The root of a cache partition: `salt` (a tenant, a request's cache_salt) keys a
    chain no other salt can reach, in the GPU index and in every tier alike."""
    if salt is None:
        return root
    h = hashlib.sha256(root)
    h.update(b"\0salt\0" + salt.encode())
    return h.digest()


def chain_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a block holding `token_ids` whose prefix has key `parent`."""
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(frozen=True)
class BlockRef:
    """A full block by content: its chain key and token ids (how blocks travel to tiers),
    and its index in its prefix when known (the tiers' cost eviction order weighs it)."""

    key: bytes
    token_ids: tuple[int, ...]
    position: int | None = None


class IndexListener(Protocol):
    """Told each key a PrefixIndex stores or forgets, in order (kv/index_events.py)."""

    def stored(self, key: bytes) -> None: ...

    def evicted(self, key: bytes) -> None: ...


class PrefixIndex:
    """Key -> block id for full computed blocks; each indexed block has exactly one key.
    A `listener`, when set, hears of every key stored and forgotten."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._entry_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self.listener: IndexListener | None = None

    def __len__(self) -> int:
        return len(self._block_of)

    def lookup(self, key: bytes, token_ids: Sequence[int]) -> int | None:
        """The block holding exactly `token_ids` under `key`, or None."""
        block_id = self._block_of.get(key)
        if block_id is None:
            return None
        if self._entry_of[block_id][1] != tuple(token_ids):
            return None
        return block_id

    def insert(self, key: bytes, token_ids: Sequence[int], block_id: int) -> bool:
        """Index a block. False (and no change) if the key or the block is indexed already."""
        if key in self._block_of or block_id in self._entry_of:
            return False
        self._block_of[key] = block_id
        self._entry_of[block_id] = (key, tuple(token_ids))
        if self.listener is not None:
            self.listener.stored(key)
        return True

    def remove_block(self, block_id: int) -> bytes | None:
        """Forget a block's key (its contents are about to be overwritten)."""
        entry = self._entry_of.pop(block_id, None)
        if entry is None:
            return None
        del self._block_of[entry[0]]
        if self.listener is not None:
            self.listener.evicted(entry[0])
        return entry[0]

    def key_of(self, block_id: int) -> bytes | None:
        entry = self._entry_of.get(block_id)
        return None if entry is None else entry[0]

    def items(self) -> list[tuple[bytes, int]]:
        return list(self._block_of.items())

    def check(self) -> list[str]:
        """Problems with the two maps' agreement (empty when consistent)."""
        problems = []
        if len(self._block_of) != len(self._entry_of):
            problems.append(
                f"prefix index has {len(self._block_of)} keys but {len(self._entry_of)} blocks"
            )
        for key, block_id in self._block_of.items():
            entry = self._entry_of.get(block_id)
            if entry is None or entry[0] != key:
                problems.append(f"prefix index key {key.hex()[:12]} -> block {block_id} mismatch")
        return problems
