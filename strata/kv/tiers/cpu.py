"""The CPU tier: a slab of (pinned, on CUDA hosts) memory cut into one slot per block.

    slab: uint8 [capacity_blocks, layout.nbytes]
    key -> slot (indexed, readable)     slots reserved but not yet published are neither
    free slots: a stack                 indexed nor free, so a half-written block is never read

It is also the staging area of the lower tiers: blocks go GPU -> cpu -> disk/remote and
come back remote/disk -> cpu -> GPU, so the slab's pinned memory is what the GPU copies
touch. Reads of a slot are valid until the mover thread next evicts it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from strata.kv.tiers.base import BlockLayout, LockedPins, PinCounts, StoredBlock, TierStore, Timer
from strata.kv.tiers.eviction import make_eviction_order
from strata.pinned import pinned_zeros


class CPUTier(LockedPins, TierStore):
    name = "cpu"

    def __init__(
        self,
        layout: BlockLayout,
        capacity_bytes: int,
        pin_memory: bool,
        eviction: str = "lru",
        slope: float = 0.0,
    ) -> None:
        """eviction: an EVICTION_ORDERS name; slope: its recompute cost slope (cost)."""
        super().__init__(layout, capacity_bytes)
        n = self.capacity_blocks
        self.slab = pinned_zeros((n, layout.nbytes), torch.uint8, pin_memory)
        self.pinned_memory = pin_memory
        self._slot_of: dict[bytes, int] = {}
        self._tokens_of: dict[bytes, tuple[int, ...]] = {}
        self._free: list[int] = list(range(n - 1, -1, -1))  # pop() gives the lowest slot
        self._pins = PinCounts()
        self._order = make_eviction_order(eviction, slope)
        self._lock = threading.Lock()

    # ---- queries ----------------------------------------------------------------------

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._slot_of for k in keys]

    @property
    def used_bytes(self) -> int:
        return (self.capacity_blocks - len(self._free)) * self.layout.nbytes

    @property
    def num_blocks(self) -> int:
        return len(self._slot_of)

    def slot_of(self, key: bytes) -> int | None:
        return self._slot_of.get(key)

    # ---- reads and writes ---------------------------------------------------------------

    def get(self, keys: Sequence[bytes]) -> list[StoredBlock | None]:
        out: list[StoredBlock | None] = []
        with self._lock:
            for key in keys:
                slot = self._slot_of.get(key)
                if slot is None:
                    self.stats.add(misses=1)
                    out.append(None)
                    continue
                self._order.accessed(key)
                self.stats.add(hits=1)
                out.append(StoredBlock(key, self._tokens_of[key], self.slab[slot]))
        return out

    def put(self, blocks: Sequence[StoredBlock]) -> None:
        for block in blocks:
            if block.key in self._slot_of:
                with self._lock:
                    self._order.accessed(block.key)
                continue
            slot = self.reserve()
            if slot is None:
                continue
            with Timer() as t:
                self.slab[slot].copy_(block.payload.reshape(-1))
            self.stats.add(bytes_written=self.layout.nbytes, write_seconds=t.seconds)
            self.publish(block.key, block.token_ids, slot, block.position)

    def reserve(self) -> int | None:
        """A free slot to write into (evicting if needed), or None if all are pinned.

        The slot is invisible until `publish`, or returned by `release_slot`.
        """
        with self._lock:
            if not self._free and not self._evict_one():
                return None
            return self._free.pop()

    def publish(
        self, key: bytes, token_ids: tuple[int, ...], slot: int, position: int | None = None
    ) -> None:
        """Make a reserved, written slot readable under `key` (`position`: its block's
        index in its prefix, for the cost eviction order; None when unknown)."""
        with self._lock:
            if key in self._slot_of:  # stored meanwhile by another path: keep the first
                self._free.append(slot)
                return
            self._slot_of[key] = slot
            self._tokens_of[key] = tuple(token_ids)
            self._order.inserted(key, position)

    def release_slot(self, slot: int) -> None:
        """Give back a reserved slot that was never published."""
        with self._lock:
            self._free.append(slot)

    # ---- pins and eviction --------------------------------------------------------------

    def _stores(self, key: bytes) -> bool:
        return key in self._slot_of

    def pin_present(self, keys: Sequence[bytes]) -> list[bytes]:
        """Pin the keys that are stored; returns them (the ones to unpin later)."""
        with self._lock:
            present = [k for k in keys if k in self._slot_of]
            self._pins.add(present)
        return present

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    def remove(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def evict(self, num_bytes: int) -> int:
        freed = 0
        with self._lock:
            while len(self._free) * self.layout.nbytes < num_bytes and self._evict_one():
                freed += self.layout.nbytes
        return freed

    def _evict_one(self) -> bool:
        victim = self._order.victim(self.is_pinned)
        if victim is None:
            return False
        self._drop(victim)
        self.stats.add(evictions=1)
        return True

    def _drop(self, key: bytes) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        del self._tokens_of[key]
        self._pins.forget(key)
        self._order.removed(key)
        self._free.append(slot)

    # ---- checks ---------------------------------------------------------------------------

    def check_integrity(self, reserved: int = 0) -> list[str]:
        """`reserved`: slots the caller holds between reserve and publish."""
        problems = []
        with self._lock:
            used = set(self._slot_of.values())
            if len(used) != len(self._slot_of):
                problems.append("cpu tier: two keys share a slot")
            if used & set(self._free):
                problems.append("cpu tier: a slot is both used and free")
            if len(used) + len(self._free) + reserved != self.capacity_blocks:
                problems.append(
                    f"cpu tier: {len(used)} used + {len(self._free)} free + {reserved} reserved "
                    f"!= {self.capacity_blocks} slots"
                )
            if self._pins.keys() - set(self._slot_of):
                problems.append("cpu tier: a pin on a key that is not stored")
        return problems

    def describe(self) -> str:
        kind = "pinned" if self.pinned_memory else "pageable"
        return (
            f"cpu {self.capacity_bytes / (1 << 30):.2f} GiB {kind}, {self.capacity_blocks} blocks"
        )
