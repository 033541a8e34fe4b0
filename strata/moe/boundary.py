"""ExpertOffload: the movable boundary between the KV pool and the expert slots.

    arena blocks: [0 ...... limit) KV pool | [limit ...... num_blocks) withdrawn, holding
                                             slots [0, capacity), capacity <= slots_above(limit)

- `limit` is the lowest block such that every block at or above it is withdrawn from
  the KV pool (KVManager.withdraw: cached KV leaves through evict_cached).
- Growing the experts' share withdraws the blocks under the old limit; blocks that a
  running sequence holds stay pending until it frees them, or until the caller's
  `preempt` hands them back (after `grace_steps` steps, or at once when forced).
- Shrinking evicts the top slots (waiting for their copies and readers), zeroes the
  blocks and gives them back to the pool, where they are allocated first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from strata.kv.manager import KVIntegrityError, KVManager
from strata.moe.arena import ExpertArena
from strata.moe.expert_cache import ExpertCache
from strata.moe.offloaded_experts import OffloadedExperts

logger = logging.getLogger("strata.moe")

Preempt = Callable[[list[str]], None]  # preempt these sequences now


class ExpertOffload:
    def __init__(
        self,
        arena: ExpertArena,
        cache: ExpertCache,
        experts: OffloadedExperts,
        initial_slots: int,
        max_slots: int,
        min_kv_blocks: int,
        grace_steps: int = 8,
    ) -> None:
        self.arena = arena
        self.cache = cache
        self.experts = experts
        # Never more slots than leave min_kv_blocks (one max_model_len sequence) to KV.
        self.max_slots = min(max_slots, arena.slots_above(min_kv_blocks))
        self.grace_steps = grace_steps
        self.kv: KVManager | None = None
        self.target_slots = initial_slots
        self.limit = arena.num_blocks
        self._pending_steps = 0
        self.num_rebalances = 0

    def attach(self, kv: KVManager) -> None:
        """Withdraw the blocks under the initial slots from a fresh KV pool."""
        self.kv = kv
        self._apply(self.target_slots, preempt=None)

    # ---- moving the boundary ---------------------------------------------------------------

    def set_expert_slots(self, num_slots: int, preempt: Preempt | None = None) -> None:
        """Move the boundary so the experts get `num_slots` slots (the KV pool the rest).
        With `preempt`, sequences holding blocks in the experts' way are preempted now;
        without, those blocks move when freed (or after grace_steps, see `advance`)."""
        num_slots = max(1, min(num_slots, self.max_slots))
        self.target_slots = num_slots
        self._pending_steps = 0
        self._apply(num_slots, preempt)

    def advance(self, preempt: Preempt | None) -> None:
        """Called before every step: finish a pending move (preempting after the grace)."""
        if self.cache.capacity == self.target_slots:
            return
        self._pending_steps += 1
        late = self._pending_steps > self.grace_steps
        self._apply(self.target_slots, preempt if late else None)

    def _apply(self, num_slots: int, preempt: Preempt | None) -> None:
        kv = self._kv()
        arena = self.arena
        target_limit = arena.limit_for_slots(num_slots)
        if num_slots < self.cache.capacity:
            self.cache.resize(num_slots)  # evicts and waits: the memory is idle after this
        back = sorted(b for b in kv.pool.withdrawn if b < target_limit)
        for b in back:
            arena.zero_blocks(b, b + 1)
            kv.restore(b)
        wanted = [b for b in range(target_limit, arena.num_blocks) if b not in kv.pool.withdrawn]
        held = [b for b in wanted if not kv.withdraw(b)]
        if held and preempt is not None:
            preempt(kv.holders(set(held)))
            for b in held:
                if not kv.withdraw(b):
                    raise KVIntegrityError(f"block {b} still held after preempting its holders")
        self.limit = self._withdrawn_limit()
        self.cache.resize(min(num_slots, arena.slots_above(self.limit)))

    def _withdrawn_limit(self) -> int:
        withdrawn = self._kv().pool.withdrawn
        b = self.arena.num_blocks
        while b > 0 and b - 1 in withdrawn:
            b -= 1
        return b

    def _kv(self) -> KVManager:
        if self.kv is None:
            raise RuntimeError("ExpertOffload is not attached to a KV manager")
        return self.kv

    # ---- introspection ---------------------------------------------------------------------

    @property
    def kv_blocks(self) -> int:
        return self.arena.num_blocks - len(self._kv().pool.withdrawn)

    def stats(self) -> dict[str, Any]:
        arena = self.arena
        block_bytes = arena.block_numel * arena.element_size
        slot_bytes = arena.expert_numel * arena.element_size
        return {
            **self.experts.stats(),
            "moe_expert_slots_target": self.target_slots,
            "moe_budget_kv_bytes": self.kv_blocks * block_bytes,
            "moe_budget_expert_bytes": self.cache.capacity * slot_bytes,
            "moe_budget_arena_bytes": arena.nbytes,
            "moe_rebalances": self.num_rebalances,
        }

    def check_integrity(self) -> None:
        """The cache's own invariants, and its slots above every KV block in use."""
        self.cache.check_integrity()
        limit = self._withdrawn_limit()
        if self.cache.capacity > self.arena.slots_above(limit):
            raise KVIntegrityError(
                f"{self.cache.capacity} expert slots overlap KV blocks under limit {limit}"
            )
