"""Rebalancer: moves the KV/expert boundary from what the workload asks for.

Every `interval` steps it compares:
- KV demand: blocks for every running and waiting sequence's tokens, plus one block of
  headroom each; and preemptions since the last decision (KV was short);
- the expert miss rate since the last decision (experts were short).

    KV short   (preemptions, or demand > KV blocks): KV gets demand * 1.25 (at least a
               tenth of the arena more), experts keep >= 1 slot
    KV spare   (demand * 1.5 < KV blocks) and miss rate > MISS_RATE_TO_GROW:
               experts get the blocks beyond demand * 1.5 (KV keeps >= min_kv_blocks)

Long contexts therefore get more KV; many short requests leave KV spare and the experts
take it. Every decision is logged with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from strata.moe.boundary import ExpertOffload, Preempt

logger = logging.getLogger("strata.moe")

MISS_RATE_TO_GROW = 0.05


@dataclass(eq=False, repr=False)
class Rebalancer:
    offload: ExpertOffload
    interval: int
    min_kv_blocks: int
    block_size: int
    _steps: int = field(default=0, init=False)
    # the counters as the last decision read them
    _last_preemptions: int = field(default=0, init=False)
    _last_uses: int = field(default=0, init=False)
    _last_misses: int = field(default=0, init=False)

    def step(
        self, seq_tokens: Iterable[int], num_preemptions: int, preempt: Preempt | None
    ) -> str | None:
        """Maybe move the boundary; returns the logged decision, if any."""
        self.offload.advance(preempt)
        self._steps += 1
        if self.interval == 0 or self._steps % self.interval:
            return None
        bs = self.block_size
        demand = sum(-(-n // bs) + 1 for n in seq_tokens)
        preempted = num_preemptions - self._last_preemptions
        self._last_preemptions = num_preemptions
        total = self.offload.experts.counters.total()
        uses, misses = total.uses - self._last_uses, total.misses + total.cpu - self._last_misses
        self._last_uses, self._last_misses = total.uses, total.misses + total.cpu
        miss_rate = misses / uses if uses else 0.0
        arena = self.offload.arena
        kv_now = self.offload.kv_blocks
        slots_now = self.offload.target_slots
        if preempted or demand > kv_now:
            want_kv = max(int(demand * 1.25), kv_now + arena.num_blocks // 10)
            why = f"{preempted} preemptions, KV demand {demand} blocks"
        elif demand * 1.5 < kv_now and miss_rate > MISS_RATE_TO_GROW:
            want_kv = max(self.min_kv_blocks, int(demand * 1.5))
            why = f"KV demand {demand} blocks, expert miss rate {miss_rate:.0%}"
        else:
            return None
        want_kv = min(max(want_kv, self.min_kv_blocks), arena.num_blocks)
        slots = max(1, min(self.offload.max_slots, arena.slots_above(want_kv)))
        if slots == slots_now:
            return None
        self.offload.set_expert_slots(slots)
        self.offload.num_rebalances += 1
        decision = (
            f"rebalance: KV {kv_now} -> {arena.limit_for_slots(slots)} blocks, expert slots "
            f"{slots_now} -> {slots} because {why}"
        )
        logger.info(decision)
        return decision
