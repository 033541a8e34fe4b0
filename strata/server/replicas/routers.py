"""Routers: which replica serves a request, and why (the reason labels /metrics).

Every router sees the same `Candidate`s (replicas alive now) and returns one of them.
Ties always fall to the fewer requests in flight, then the lower KV use, then the lower
replica number, so a choice is deterministic given the same state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from strata.registry import Registry

# An in-flight request costs about half a cache-less prefill of this one: continuous
# batching shares steps between requests, so queueing behind one is not a full wait.
LOAD_WEIGHT = 0.5


@dataclass(frozen=True)
class Candidate:
    replica: int
    in_flight: int  # requests the front has sent and not yet seen finish
    kv_use: float  # fraction of the replica's KV blocks in use (its last report)
    prefix_blocks: int  # leading prompt blocks the replica holds (BlockIndex)


@dataclass(frozen=True)
class Decision:
    replica: int
    reason: str  # prefix | load | round_robin


class Router(Protocol):
    def choose(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Decision: ...


def _load_order(c: Candidate) -> tuple[int, float, int]:
    return (c.in_flight, c.kv_use, c.replica)


class LeastLoaded:
    def choose(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Decision:
        return Decision(min(candidates, key=_load_order).replica, "load")


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Decision:
        ordered = sorted(candidates, key=lambda c: c.replica)
        pick = next((c for c in ordered if c.replica >= self._next), ordered[0])
        self._next = pick.replica + 1
        return Decision(pick.replica, "round_robin")


class KVAware:
    """Cost in blocks: the prompt blocks the replica must compute (those it does not
    hold) plus LOAD_WEIGHT * prompt blocks per request in flight there. The reason is
    "prefix" when the pick holds more of the prompt than some other candidate."""

    def choose(self, candidates: Sequence[Candidate], prompt_blocks: int) -> Decision:
        def cost(c: Candidate) -> tuple[float, int, float, int]:
            blocks = prompt_blocks - c.prefix_blocks + LOAD_WEIGHT * prompt_blocks * c.in_flight
            return (blocks, *_load_order(c))

        pick = min(candidates, key=cost)
        fewest = min(c.prefix_blocks for c in candidates)
        return Decision(pick.replica, "prefix" if pick.prefix_blocks > fewest else "load")


ROUTERS: Registry[type[Router]] = Registry("router", {
    "kv-aware": KVAware,
    "least-loaded": LeastLoaded,
    "round-robin": RoundRobin,
})  # fmt: skip
