"""Session pins: a multi-turn conversation's KV kept for `cache_ttl_s` after each turn.

When a turn of session S ends, the full blocks of its prompt and output are pinned in
the highest tier that fits, so the next turn finds them even under memory pressure:

    GPU   while pinned GPU blocks stay within `gpu_fraction` of the pool; with a CPU tier
          the pool takes them back first when it runs out (`reclaim`), demoting the pin
    CPU   otherwise (blocks there were written through when computed)

A new turn of S replaces its pin; a pin is released when its TTL expires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from strata.kv.manager import KVManager

logger = logging.getLogger("strata.kv.sessions")


class CPUTierHolds(Protocol):
    """Pins in the CPU tier by owner (`TierManager` is one)."""

    def hold(self, owner: str, keys: Sequence[bytes]) -> None: ...

    def release(self, owner: str) -> None: ...


@dataclass
class _Pin:
    session_id: str
    expires_at: float
    keys: list[bytes]
    on_gpu: bool
    in_cpu: bool

    @property
    def owner(self) -> str:
        return f"session:{self.session_id}"


class SessionPins:
    def __init__(
        self,
        kv: KVManager,
        cpu_holds: CPUTierHolds | None,
        gpu_fraction: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.cpu_holds = cpu_holds  # None without tiers: pins live on the GPU or nowhere
        self.gpu_budget = int(kv.num_blocks * gpu_fraction)
        self.clock = clock
        self._pins: dict[str, _Pin] = {}
        self.num_pinned = 0
        self.num_expired = 0
        self.num_demoted = 0

    def __len__(self) -> int:
        return len(self._pins)

    def pin(self, session_id: str, ttl_s: float, seq_id: str) -> None:
        """Pin the full blocks of a finished turn (call before its blocks are freed)."""
        self.release(session_id)
        keys = self.kv.keys_of(seq_id)
        if not keys:
            return
        blocks = self.kv.block_table(seq_id)[: len(keys)]
        pin = _Pin(session_id, self.clock() + ttl_s, keys, on_gpu=False, in_cpu=False)
        if self.kv.num_held_blocks + len(blocks) <= self.gpu_budget:
            self.kv.hold(pin.owner, blocks)
            pin.on_gpu = True
        elif self.cpu_holds is not None:
            self.cpu_holds.hold(pin.owner, keys)
            pin.in_cpu = True
        else:
            logger.info("session %s: %d blocks do not fit the GPU pin budget (%d blocks) and "
                        "there is no CPU tier; not pinned", session_id, len(blocks),
                        self.gpu_budget)  # fmt: skip
            return
        self._pins[session_id] = pin
        self.num_pinned += 1

    def release(self, session_id: str) -> None:
        pin = self._pins.pop(session_id, None)
        if pin is None:
            return
        if pin.on_gpu:
            self.kv.release(pin.owner)
        if pin.in_cpu and self.cpu_holds is not None:
            self.cpu_holds.release(pin.owner)

    def expire(self) -> int:
        """Release every pin whose TTL has passed; returns how many."""
        now = self.clock()
        expired = [s for s, p in self._pins.items() if p.expires_at <= now]
        for session_id in expired:
            self.release(session_id)
        self.num_expired += len(expired)
        return len(expired)

    def reclaim(self) -> bool:
        """Demote the GPU pin that expires first to the CPU tier; False if there is none.

        Without a CPU tier a pin is never dropped before its TTL: the pool preempts or
        queues other work instead.
        """
        on_gpu = [p for p in self._pins.values() if p.on_gpu]
        if not on_gpu or self.cpu_holds is None:
            return False
        pin = min(on_gpu, key=lambda p: p.expires_at)
        self.cpu_holds.hold(pin.owner, pin.keys)
        pin.in_cpu = True
        self.kv.release(pin.owner)
        pin.on_gpu = False
        self.num_demoted += 1
        return True

    def where(self, session_id: str) -> str | None:
        """Where the session's pin lives: "gpu", "cpu", or None when it has none."""
        pin = self._pins.get(session_id)
        if pin is None:
            return None
        return "gpu" if pin.on_gpu else "cpu"

    def stats(self) -> dict[str, int]:
        return {
            "kv_sessions_pinned_gpu": sum(p.on_gpu for p in self._pins.values()),
            "kv_sessions_pinned_cpu": sum(p.in_cpu and not p.on_gpu for p in self._pins.values()),
            "kv_session_blocks_on_gpu": self.kv.num_held_blocks,
            "kv_sessions_expired": self.num_expired,
            "kv_sessions_demoted": self.num_demoted,
        }
