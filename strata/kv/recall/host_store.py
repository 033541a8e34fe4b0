"""HostKVStore: the recall store's pinned host slab of KV blocks, one slot per block.

    k, v: [sparse layers, slots, kv_heads, block_size, head_dim]   (pinned on CUDA hosts)

A slot holds one block of one sequence in every sparse layer (the layers a recall policy
selects in); row (layer, slot, head) is one block of one head, block_size x head_dim
contiguous: the unit a per-head recall fetches. Slots are handed out from an ordered
free list and owned by one sequence until it is freed.

Invariants (`check_integrity`): every slot is either free or owned by exactly one
sequence; the free list and the owners' lists partition range(num_slots).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from strata.errors import StrataError


class HostStoreFullError(StrataError, RuntimeError):
    """The recall store has fewer free slots than a sequence asked for."""


class HostKVStore:
    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        pin: bool,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"the recall store needs at least one slot, got {num_slots}")
        shape = (num_layers, num_slots, num_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.num_slots = num_slots
        self.bytes_per_slot = self.slot_bytes(num_layers, num_kv_heads, block_size, head_dim, dtype)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))
        self._owned: dict[str, list[int]] = {}

    @staticmethod
    def slot_bytes(
        num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one slot (K and V of one block in every sparse layer)."""
        item = dtype.itemsize
        return 2 * num_layers * num_kv_heads * block_size * head_dim * item

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.bytes_per_slot

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - self.num_free) * self.bytes_per_slot

    def allocate(self, owner: str, n: int) -> list[int]:
        """n slots for `owner`, in free-list order; all or nothing."""
        if n > len(self._free):
            raise HostStoreFullError(
                f"the recall store has {len(self._free)} free slots of {self.num_slots}; "
                f"{n} asked for"
            )
        slots = [self._free.popitem(last=False)[0] for _ in range(n)]
        self._owned.setdefault(owner, []).extend(slots)
        return slots

    def owned(self, owner: str) -> list[int]:
        return list(self._owned.get(owner, ()))

    def free(self, owner: str) -> int:
        """Return every slot of `owner` to the back of the free list; how many."""
        slots = self._owned.pop(owner, [])
        for slot in slots:
            self._free[slot] = None
        return len(slots)

    def check_integrity(self) -> list[str]:
        """Problems found (empty when the invariants hold)."""
        problems = []
        seen: dict[int, str] = {}
        for owner, slots in self._owned.items():
            for slot in slots:
                if slot in seen:
                    problems.append(f"host slot {slot} owned by {seen[slot]!r} and {owner!r}")
                if slot in self._free:
                    problems.append(f"host slot {slot} is owned by {owner!r} and free")
                seen[slot] = owner
        if len(seen) + len(self._free) != self.num_slots:
            problems.append(
                f"{len(seen)} owned + {len(self._free)} free host slots != {self.num_slots}"
            )
        return problems
