"""HostKVStore: the recall store's pinned host slab, one slot per block's keys or values.

    data: [sparse layers, slots, kv_heads, block_size, head_dim]   (pinned on CUDA hosts)

A slot holds one block's keys, or its values, in every sparse layer (the layers a recall
policy selects in); row (layer, slot, head) is one block of one head, block_size x
head_dim contiguous: the unit a per-head recall fetches. A sequence takes a key slot and
a value slot per block, and gives its key slots back early if its policy stops reading
keys from the host (shadowkv, once its low-rank keys are fitted). Slots are handed out
from an ordered free list and owned by one sequence until it gives them back.

Invariants (`check_integrity`): every slot is either free or owned by exactly one
sequence; the free list and the owners' sets partition range(num_slots).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

from strata.errors import StrataError
from strata.pinned import pinned_zeros


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
        self.data = pinned_zeros(shape, dtype, pin)
        self.num_slots = num_slots
        self.bytes_per_slot = self.slot_bytes(num_layers, num_kv_heads, block_size, head_dim, dtype)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))
        self._owned: dict[str, list[int]] = {}

    @staticmethod
    def slot_bytes(
        num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one slot (the keys or the values of one block in every sparse layer)."""
        return num_layers * num_kv_heads * block_size * head_dim * dtype.itemsize

    def flat(self) -> torch.Tensor:
        """The slab as [rows, block_size * head_dim]; row (layer, slot, head) is
        (layer * num_slots + slot) * kv_heads + head."""
        return self.data.view(-1, self.data.shape[-2] * self.data.shape[-1])

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

    def give_back(self, owner: str, slots: Iterable[int]) -> None:
        """Return some of `owner`'s slots to the back of the free list, in order."""
        gone = list(slots)
        left, held = set(gone), self._owned.get(owner, [])
        if len(left) != len(gone) or not left.issubset(held):
            raise RuntimeError(f"{owner!r} gives back host slots it does not hold")
        self._owned[owner] = [slot for slot in held if slot not in left]
        for slot in gone:
            self._free[slot] = None

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
