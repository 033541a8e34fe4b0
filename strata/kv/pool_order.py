"""Which free block the GPU pool hands out next: the order cached KV leaves the GPU.

A free block holds cached KV (it is in the prefix index) or nothing. `BlockPool` asks
its order for each block it allocates and tells it when a block is freed or taken off
the free list; the `KVManager` tells it when a block is indexed, reused or forgotten.

    lru   the free list's own order: least recently released first. A sequence releases
          its tail first, so its tail goes before its head (blocks.py).
    cost  empty blocks first, then cached ones by lowest value, GreedyDual-style
          (keep_value.py, shared with the tiers' cost order):

              value(b) = L + uses(b) * (1 + slope * position(b))     set when b is freed

          slope comes from the model's shape (`attention_slope`); uses(b) is one plus the
          prefix hits that reused b: its hit likelihood; L is the value of the last block
          evicted. Equal values leave in the order they were freed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from strata.kv.keep_value import keep_value, recompute_cost
from strata.kv.lazy_heap import LazyHeap
from strata.registry import Registry

if TYPE_CHECKING:
    from strata.config import ModelConfig


class FreeBlockOrder:
    """Chooses `BlockPool.allocate`'s block: this base takes the free list's front (lru).
    The hooks tell an order that keeps state what happened; here they do nothing.

    slope: attention's share of a block's recompute per block before it (attention_slope).
    """

    def __init__(self, slope: float = 0.0) -> None:
        if slope < 0:
            raise ValueError(f"the recompute cost slope must be >= 0, got {slope}")
        self.slope = slope

    def victim(self, free: Mapping[int, None]) -> int:
        """The free block to allocate next (`free` in release order, never empty)."""
        return next(iter(free))

    def freed(self, block_id: int) -> None:
        """The block's last reference was dropped: it is free now."""

    def taken(self, block_id: int) -> None:
        """The block left the free list (allocated, revived by a hit, or withdrawn)."""

    def indexed(self, block_id: int, position: int) -> None:
        """The block (held) now caches block `position` of a prefix."""

    def reused(self, block_id: int) -> None:
        """A prefix hit reused the cached block."""

    def forgotten(self, block_id: int) -> None:
        """The block left the prefix index: it holds nothing worth keeping."""

    def check(self, free: set[int]) -> list[str]:
        """Problems with the order's view of the free blocks (empty when consistent)."""
        return []


class LRUFreeOrder(FreeBlockOrder):
    """Least recently released first: the free list's order."""


class CostFreeOrder(FreeBlockOrder):
    """Hit likelihood x recompute cost (see the module docstring)."""

    def __init__(self, slope: float = 0.0) -> None:
        super().__init__(slope)
        self.inflation = 0.0  # L: the value of the last cached block evicted
        self._position: dict[int, int] = {}  # indexed blocks, free or held
        self._uses: dict[int, int] = {}
        self._empty: OrderedDict[int, None] = OrderedDict()  # free blocks caching nothing
        self._cached: LazyHeap[int] = LazyHeap()  # free cached blocks, by value when freed

    def cost(self, position: int) -> float:
        return recompute_cost(position, self.slope)

    def value(self, block_id: int) -> float:
        """What keeping the block is worth if it were freed now."""
        return keep_value(self.inflation, self._uses[block_id], self._position[block_id],
                          self.slope)  # fmt: skip

    def victim(self, free: Mapping[int, None]) -> int:
        if self._empty:
            return next(iter(self._empty))
        lowest = self._cached.lowest()
        assert lowest is not None, "the pool asked for a block with none free"
        self.inflation, block_id = lowest
        return block_id

    def freed(self, block_id: int) -> None:
        if block_id not in self._position:
            self._empty[block_id] = None
            return
        self._cached.push(block_id, self.value(block_id))

    def taken(self, block_id: int) -> None:
        self._empty.pop(block_id, None)
        self._cached.discard(block_id)

    def indexed(self, block_id: int, position: int) -> None:
        self._position[block_id] = position
        self._uses[block_id] = 1

    def reused(self, block_id: int) -> None:
        self._uses[block_id] += 1

    def forgotten(self, block_id: int) -> None:
        self._position.pop(block_id, None)
        self._uses.pop(block_id, None)
        if self._cached.discard(block_id):
            self._empty[block_id] = None

    def check(self, free: set[int]) -> list[str]:
        cached = set(self._cached)
        tracked = set(self._empty) | cached
        if tracked != free or not cached.isdisjoint(self._empty):
            return [f"cost order tracks free blocks {sorted(tracked)}, pool has {sorted(free)}"]
        return [f"cached block {b} is free but not indexed" for b in cached
                if b not in self._position]  # fmt: skip


def attention_slope(model: ModelConfig, block_size: int) -> float:
    """Attention's work per block of context over the layers' work, for one block of
    queries: (2 * block_size * layers * q heads * head dim) / parameters per token."""
    hidden, q = model.hidden_size, model.num_heads * model.head_dim
    kv = 2 * model.num_kv_heads * model.head_dim
    if model.num_experts:
        mlp = 3 * hidden * model.moe_intermediate_size * model.num_experts_per_tok
        mlp += 3 * hidden * model.shared_expert_intermediate_size
    else:
        mlp = 3 * hidden * model.intermediate_size
    per_token = model.num_layers * (hidden * (q + kv) + q * hidden + mlp)
    return 2 * block_size * model.num_layers * q / per_token


FREE_BLOCK_ORDERS: Registry[type[FreeBlockOrder]] = Registry(
    "kv_eviction", {"lru": LRUFreeOrder, "cost": CostFreeOrder}
)


def make_free_order(name: str, slope: float = 0.0) -> FreeBlockOrder:
    return FREE_BLOCK_ORDERS.get(name)(slope)
