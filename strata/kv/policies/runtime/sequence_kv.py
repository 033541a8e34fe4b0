"""SequenceKV: one sequence's KV slots under a policy, apart from its token positions.

Without a policy a sequence's slot s holds token s. With one, tokens are evicted and the
survivors compacted, so each layer holds fewer slots than there are computed tokens:

    tokens      | 0 1 2 3 4 5 6 7 8 9 |10 11 12      num_computed = 13
    layer l     | 0 1 5 9             |10 11 12      kept at the compaction, then appended
    slots       | 0 1 2 3             | 4  5  6      layer_len(l) = 13 - evicted[l] = 7

- Slots below `kept_len[l]` (the last compaction's survivors) hold `kept_pos[l]`, per KV
  head; slot s above holds token s + evicted[l]. Tokens after a compaction append in order.
- The runner writes a step's tokens at slots layer_len(l).. and RoPE uses their token
  positions; keys are cached after RoPE, so kept tokens keep their positions.
- Blocks are held for `max_slots` = the longest layer; shorter layers (PyramidKV) mask
  the rest by their own context length.
- A policy that evicts while decoding lets the cache grow to cap + evict_interval - 1
  slots and then evicts back to cap (`budgets_after`), once per `evict_interval` steps.
"""

from __future__ import annotations

from typing import Protocol

import torch

from strata.kv.policies.base import Compaction, KVPolicy
from strata.kv.policies.budget import tokens_allowed, tokens_kept


class _Computed(Protocol):
    @property
    def num_computed(self) -> int: ...


class SequenceKV:
    def __init__(
        self,
        seq: _Computed,
        policy: KVPolicy,
        budget: float,
        context_len: int,
        num_prompt: int,
        device: torch.device,
        evict_interval: int = 1,
    ) -> None:
        self._seq = seq  # the Sequence: num_computed is its own, never a copy
        self.policy = policy
        self.budget = budget
        self.context_len = context_len  # C: the prompt tokens compressed as a context
        self.num_prompt = num_prompt
        self.device = device
        self.evict_interval = evict_interval
        self.num_layers = policy.shape.num_layers
        self.num_kv_heads = policy.shape.num_kv_heads
        self.reset()

    @property
    def num_computed(self) -> int:
        return self._seq.num_computed

    def reset(self) -> None:
        """Back to no KV at all (preemption by recompute)."""
        self.evicted = [0] * self.num_layers
        self.kept_pos: list[torch.Tensor | None] = [None] * self.num_layers
        self.compressed = False  # past the compression point: never indexed again
        self.num_compactions = 0
        self.policy.reset()

    # ---- KVView ---------------------------------------------------------------------------

    def num_slots(self, layer: int) -> int:
        return self.num_computed - self.evicted[layer]

    def positions(self, layer: int) -> torch.Tensor:
        kept = self.kept_pos[layer]
        first = 0 if kept is None else kept.shape[-1]
        tail = torch.arange(first, self.num_slots(layer), device=self.device) + self.evicted[layer]
        tail = tail.expand(self.num_kv_heads, -1)
        return tail if kept is None else torch.cat([kept, tail], dim=-1)

    # ---- what the scheduler asks ------------------------------------------------------------

    @property
    def max_slots(self) -> int:
        """Slots of the longest layer: what the sequence's blocks must hold."""
        return self.num_computed - min(self.evicted)

    def slot_offsets(self) -> list[int]:
        """Per layer, how many slots it is short of the longest one (0 for uniform policies)."""
        low = min(self.evicted)
        return [e - low for e in self.evicted]

    def chunk_limit(self, start: int, n: int) -> int:
        """Shorten a chunk of n tokens from `start` so that it stops at the compression point."""
        if not self.compressed and start < self.context_len:
            return min(n, self.context_len - start)
        return n

    def first_observed_token(self) -> int:
        """A prefix-cache hit must stop here so the policy sees the queries it needs."""
        if self.compressed:
            return 0
        return min(self.policy.first_observed_token(self.context_len), self.context_len - 1)

    @property
    def decode_cap(self) -> int:
        """Slots an evicting policy keeps while decoding: the budget in tokens (not capped
        by the context) plus the prompt tokens after the context."""
        return tokens_allowed(self.budget, self.context_len) + self.num_prompt - self.context_len

    def compress_budgets(self) -> list[int]:
        keep = tokens_kept(self.budget, self.context_len)
        return self.policy.layer_budgets(keep, self)

    def budgets_after(self, end: int) -> list[int] | None:
        """Per-layer slots kept by the compaction that follows a step ending at token `end`,
        or None if no compaction follows it."""
        if not self.compressed and end >= self.context_len:  # chunks stop at C: end == C
            budgets = self.compress_budgets()
            slots = [end - e for e in self.evicted]
            if any(b < s for b, s in zip(budgets, slots, strict=True)):
                return [min(b, s) for b, s in zip(budgets, slots, strict=True)]
            return None
        if self.compressed and self.policy.evicts_during_decode and end >= self.num_prompt:
            cap = self.decode_cap
            if end - min(self.evicted) >= cap + self.evict_interval:
                return [cap] * self.num_layers
        return None

    def compacts_after(self, end: int) -> bool:
        """Whether a compaction follows the step that ends at token `end`."""
        return self.budgets_after(end) is not None

    # ---- after a compaction -----------------------------------------------------------------

    def compacted(self, compaction: Compaction) -> None:
        """Record a compaction the engine performed (kept slots now lead every layer)."""
        for layer, index in enumerate(compaction.new_to_old):
            self.kept_pos[layer] = torch.gather(self.positions(layer), -1, index)
            self.evicted[layer] += compaction.old_num_slots[layer] - index.shape[-1]
        self.num_compactions += 1
        self.policy.remap(compaction)
