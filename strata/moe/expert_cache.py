"""The GPU expert cache: slots holding experts, filled from the host store on a side stream.

    slot j: one flat expert (host_store.py layout), a view given by `slot_view(j)`
            (the top of the GPU arena, arena.py); slots [0, capacity) are usable.

Per slot, two CUDA events order the copy stream against the compute stream:
- `ready`: recorded on the copy stream after the expert's bytes landed; compute waits on
  it (`wait_ready`) before reading the slot, so it waits only for what it needs.
- `last_use`: recorded on the compute stream after the last kernel that reads the slot;
  a later copy into the slot waits on it, so an expert is never overwritten in use.
On the CPU (tests) there are no streams: copies are plain and events are None.

Invariants (check_integrity): slot_of and the slots agree; every resident key is known
to the policy exactly once; free slots hold nothing; pinned slots are resident.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from strata.errors import StrataError
from strata.moe.host_store import HostExpertStore
from strata.moe.policies import EvictionPolicy, ExpertKey


class ExpertCacheIntegrityError(StrataError, RuntimeError):
    """Slots, the key map and the policy disagree: a bug, never user error."""


@dataclass
class _Slot:
    key: ExpertKey | None = None
    precision: str = "full"
    ready: torch.cuda.Event | None = None
    last_use: torch.cuda.Event | None = None


class ExpertCache:
    def __init__(
        self,
        store: HostExpertStore,
        slot_view: Callable[[int], torch.Tensor],
        capacity: int,
        policy: EvictionPolicy,
        device: torch.device,
    ) -> None:
        self.store = store
        self.slot_view = slot_view
        self.policy = policy
        self.device = device
        self.capacity = 0
        self._slots: list[_Slot] = []
        self._free: list[int] = []  # heap: the lowest free slot is filled first
        self.slot_of: dict[ExpertKey, int] = {}
        self.pinned: set[int] = set()
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._staging: torch.Tensor | None = None  # low-precision bytes land here
        self.bytes_moved = 0
        self.num_loads = 0
        self.resize(capacity)

    # ---- lookups ---------------------------------------------------------------------------

    def lookup(self, key: ExpertKey, need_full: bool) -> int | None:
        """The slot holding `key` at an acceptable precision, counted as an access."""
        slot = self.slot_of.get(key)
        if slot is None or (need_full and self._slots[slot].precision != "full"):
            return None
        self.policy.on_access(key)
        return slot

    def has_free_slot(self) -> bool:
        return bool(self._free)

    def precision_of(self, slot: int) -> str:
        return self._slots[slot].precision

    def view(self, slot: int) -> torch.Tensor:
        return self.slot_view(slot)

    # ---- loading ---------------------------------------------------------------------------

    def load(self, key: ExpertKey, precision: str = "full") -> int | None:
        """Copy `key` into a slot (a free one, else the policy's victim among unpinned
        slots). None when every slot is pinned. Replaces a lower-precision copy of key."""
        old = self.slot_of.get(key)
        if old is not None:
            if old in self.pinned:
                return None
            self._evict(old)
        slot = self._take_slot(key[0])
        if slot is None:
            return None
        state = self._slots[slot]
        dst = self.slot_view(slot)
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                if state.last_use is not None:
                    self.copy_stream.wait_event(state.last_use)
                self._copy(key, precision, dst)
                state.ready = torch.cuda.Event()
                state.ready.record(self.copy_stream)
        else:
            self._copy(key, precision, dst)
        state.key, state.precision, state.last_use = key, precision, None
        self.slot_of[key] = slot
        self.policy.on_insert(key)
        self.num_loads += 1
        return slot

    def _copy(self, key: ExpertKey, precision: str, dst: torch.Tensor) -> None:
        layer, expert = key
        if precision == "full":
            self.store.copy_into(layer, expert, dst)
            self.bytes_moved += self.store.expert_bytes
            return
        src = self.store.low(layer, expert)
        if self._staging is None or self._staging.numel() != src.numel():
            self._staging = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
        # Stream order makes reusing one staging buffer safe: the next copy into it
        # runs after this dequantization on the same stream.
        self._staging.copy_(src, non_blocking=True)
        self.store.dequantize_into(self._staging, dst)
        self.bytes_moved += src.numel()

    def _take_slot(self, for_layer: int) -> int | None:
        if self._free:
            return heapq.heappop(self._free)
        exclude = {key for s in self.pinned if (key := self._slots[s].key) is not None}
        victim = self.policy.victim(for_layer, self.capacity, exclude)
        if victim is None:
            return None
        slot = self.slot_of[victim]
        self._evict(slot)
        return heapq.heappop(self._free)

    def _evict(self, slot: int) -> None:
        state = self._slots[slot]
        assert state.key is not None
        self.policy.on_remove(state.key)
        del self.slot_of[state.key]
        state.key, state.precision = None, "full"
        heapq.heappush(self._free, slot)

    # ---- use by the compute stream ---------------------------------------------------------

    def pin(self, slot: int) -> None:
        self.pinned.add(slot)

    def wait_ready(self, slot: int) -> None:
        event = self._slots[slot].ready
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def release_pins(self) -> None:
        """The pinned slots' readers are all issued: record their last use, unpin them."""
        if self.cuda and self.pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            for slot in self.pinned:
                self._slots[slot].last_use = event
        self.pinned.clear()

    # ---- capacity --------------------------------------------------------------------------

    def resize(self, capacity: int) -> None:
        """Use slots [0, capacity). Shrinking evicts the top slots and waits until no copy
        or kernel touches them, so their memory can be handed to the KV pool."""
        if capacity < 0:
            raise ValueError(f"expert cache capacity must be >= 0, got {capacity}")
        if self.pinned:
            raise ExpertCacheIntegrityError("resize while slots are pinned (mid-forward)")
        if capacity < self.capacity:
            for slot in range(capacity, self.capacity):
                if self._slots[slot].key is not None:
                    self._evict(slot)
            self._free = [s for s in self._free if s < capacity]
            heapq.heapify(self._free)
            del self._slots[capacity:]
            if self.cuda:
                torch.cuda.synchronize(self.device)
        for slot in range(self.capacity, capacity):
            self._slots.append(_Slot())
            heapq.heappush(self._free, slot)
        self.capacity = capacity

    @property
    def num_resident(self) -> int:
        return len(self.slot_of)

    def resident(self) -> dict[ExpertKey, int]:
        return dict(self.slot_of)

    # ---- integrity -------------------------------------------------------------------------

    def check_integrity(self) -> None:
        problems: list[str] = []
        if len(self._slots) != self.capacity:
            problems.append(f"{len(self._slots)} slot records for capacity {self.capacity}")
        free = set(self._free)
        if len(free) != len(self._free):
            problems.append("a slot is free twice")
        for slot, state in enumerate(self._slots):
            if state.key is None and slot not in free:
                problems.append(f"slot {slot} is empty but not free")
            if state.key is not None and slot in free:
                problems.append(f"slot {slot} holds {state.key} but is free")
            if state.key is not None and self.slot_of.get(state.key) != slot:
                problems.append(f"slot {slot} holds {state.key} but the map says otherwise")
        for key, slot in self.slot_of.items():
            if not 0 <= slot < self.capacity or self._slots[slot].key != key:
                problems.append(f"map entry {key} -> {slot} is stale")
        if self.pinned:
            problems.append(f"slots {sorted(self.pinned)} still pinned between steps")
        if problems:
            raise ExpertCacheIntegrityError("expert cache integrity:\n  " + "\n  ".join(problems))
