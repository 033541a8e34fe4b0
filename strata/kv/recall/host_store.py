"""HostKVStore: the recall store's pinned host slab, one slot per block's keys or values.

    data: [layers, slots, kv_heads, block_size, head_dim]   (pinned on CUDA hosts)

A slot holds one block's keys, or its values, in every layer the store keeps: the sparse
layers (those a recall policy selects in) first, then, when prefixes are shared, the
dense ones (RecallGeometry.host_layer). Row (layer, slot, head) is one block of one
head, block_size x head_dim contiguous: the unit a per-head recall fetches. A sequence
holds a key slot and a value slot per block, and drops its key slots early if its policy
stops reading keys from the host (shadowkv, once its low-rank keys are fitted).

Slots are refcounted. Full prompt blocks are published under their chained block key
(`publish`, published.py), and a later sequence with the same prefix holds references
on them instead of slots of its own. Each slot is in exactly one state:

    free     no holder, not published     the free list, handed out in order
    held     refcount > 0                 by the owners listed in `owned`
    cached   no holder, published         evictable, least recently released first

`allocate` takes free slots first, then evicts cached ones (their block leaves the
index; its other slot, if cached too, becomes free), so it fails only when fewer than n
slots are free or cached. A published slot's contents never change while it is indexed:
sequences write only into slots they allocated and have not published.

Invariants (`check_integrity`): free, held and cached partition range(num_slots); a
slot's refcount is the number of owners listing it (each at most once); cached slots
are published, free ones are not; the index is consistent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from strata.errors import StrataError
from strata.kv.prefix import BlockRef
from strata.kv.recall.published import PublishedBlock, PublishedBlocks
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
        self.num_slots, self.num_layers = num_slots, num_layers
        self.bytes_per_slot = self.slot_bytes(num_layers, num_kv_heads, block_size, head_dim, dtype)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self._refs = [0] * num_slots
        self._shared = 0  # slots whose refcount is above 1
        self._owned: dict[str, list[int]] = {}
        self.index = PublishedBlocks()
        self.num_evicted = 0  # cached slots taken by `allocate`

    @staticmethod
    def slot_bytes(
        num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one slot (the keys or the values of one block in every stored layer)."""
        return num_layers * num_kv_heads * block_size * head_dim * dtype.itemsize

    def flat(self) -> torch.Tensor:
        """The slab as [rows, block_size * head_dim]; row (layer, slot, head) is
        (layer * num_slots + slot) * kv_heads + head."""
        return self.data.view(-1, self.data.shape[-2] * self.data.shape[-1])

    # ---- counts --------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Slots `allocate` can hand out now: free, or cached (evicted on the way)."""
        return len(self._free) + len(self._cached)

    @property
    def num_shared(self) -> int:
        """Slots held by more than one sequence."""
        return self._shared

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.bytes_per_slot

    @property
    def used_bytes(self) -> int:
        """Bytes of held slots (cached ones are evictable: not counted)."""
        return (self.num_slots - self.num_available) * self.bytes_per_slot

    @property
    def cached_bytes(self) -> int:
        return len(self._cached) * self.bytes_per_slot

    def num_unheld(self, slots: Iterable[int]) -> int:
        """How many of `slots` nobody holds (cached ones: holding them takes them from
        what `allocate` could hand out)."""
        return sum(1 for slot in slots if self._refs[slot] == 0)

    # ---- holding slots ---------------------------------------------------------------------

    def allocate(self, owner: str, n: int) -> list[int]:
        """n new slots for `owner`: free ones in free-list order, then cached ones, least
        recently released first (evicted); all or nothing."""
        if n > self.num_available:
            raise HostStoreFullError(
                f"the recall store has {self.num_available} free slots of {self.num_slots}; "
                f"{n} asked for"
            )
        slots = [self._take_free() for _ in range(n)]
        for slot in slots:
            self._refs[slot] = 1
        self._owned.setdefault(owner, []).extend(slots)
        return slots

    def _take_free(self) -> int:
        if not self._free:
            self._evict_one()
        return self._free.popitem(last=False)[0]

    def _evict_one(self) -> None:
        """The least recently released cached slot's block leaves the index: its cached
        slots become free (a slot of it still held stays so, unpublished)."""
        slot = next(iter(self._cached))
        block = self.index.forget(slot)
        assert block is not None, f"cached host slot {slot} is not published"
        for s in block.slots:
            if s in self._cached:
                del self._cached[s]
                self._free[s] = None
                self.num_evicted += 1

    def hold(self, owner: str, slots: Sequence[int]) -> None:
        """`owner` takes a reference on each of these published slots (held or cached)."""
        held = self._owned.setdefault(owner, [])
        taken = set(held)
        for slot in slots:
            if self.index.block_of(slot) is None or slot in taken:
                raise RuntimeError(f"{owner!r} cannot hold host slot {slot}")
            taken.add(slot)
            self._cached.pop(slot, None)
            self._refs[slot] += 1
            self._shared += self._refs[slot] == 2
            held.append(slot)

    def owned(self, owner: str) -> list[int]:
        return list(self._owned.get(owner, ()))

    def owners(self) -> set[str]:
        return set(self._owned)

    def free(self, owner: str) -> int:
        """Drop every reference of `owner`; how many it held."""
        slots = self._owned.pop(owner, [])
        for slot in slots:
            self._drop(slot)
        return len(slots)

    def give_back(self, owner: str, slots: Iterable[int]) -> None:
        """Drop some of `owner`'s references, in order: a slot nobody holds any more goes
        to the back of the free list, or, if published, of the cached ones."""
        gone = list(slots)
        left, held = set(gone), self._owned.get(owner, [])
        if len(left) != len(gone) or not left.issubset(held):
            raise RuntimeError(f"{owner!r} gives back host slots it does not hold")
        self._owned[owner] = [slot for slot in held if slot not in left]
        for slot in gone:
            self._drop(slot)

    def _drop(self, slot: int) -> None:
        self._refs[slot] -= 1
        self._shared -= self._refs[slot] == 1
        if self._refs[slot] == 0:
            if self.index.block_of(slot) is None:
                self._free[slot] = None
            else:
                self._cached[slot] = None

    # ---- the prefix index --------------------------------------------------------------------

    def publish(self, owner: str, blocks: Sequence[PublishedBlock]) -> int:
        """Index full blocks whose two slots `owner` holds and has written in every layer;
        how many were indexed (not one whose key or a slot is indexed already)."""
        held = set(self._owned.get(owner, ()))
        if any(slot not in held for block in blocks for slot in block.slots):
            raise RuntimeError(f"{owner!r} publishes host slots it does not hold")
        return sum(self.index.add(block) for block in blocks)

    def leading(self, refs: Sequence[BlockRef]) -> list[PublishedBlock]:
        """The published blocks of the longest run of leading `refs` the store holds."""
        return self.index.leading(refs)

    def check_integrity(self) -> list[str]:
        """Problems found (empty when the invariants hold)."""
        problems = self.index.check()
        counted = [0] * self.num_slots
        for owner, slots in self._owned.items():
            if len(set(slots)) != len(slots):
                problems.append(f"{owner!r} lists a host slot twice")
            for slot in slots:
                counted[slot] += 1
        if counted != self._refs:
            problems.append("host slot refcounts differ from their owners' references")
        if self._shared != sum(1 for refs in self._refs if refs > 1):
            problems.append(f"{self._shared} host slots counted shared, not as many held so")
        free, cached = set(self._free), set(self._cached)
        held = {slot for slot, refs in enumerate(self._refs) if refs > 0}
        if free & held or free & cached or held & cached:
            problems.append("a host slot is two of free, held and cached")
        if len(free | held | cached) != self.num_slots:
            problems.append("a host slot is none of free, held and cached")
        published = {slot for block in self.index for slot in block.slots}
        if free & published or cached - published:
            problems.append("a free host slot is published, or a cached one is not")
        return problems
