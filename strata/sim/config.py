"""SimConfig: the simulated cluster — replicas, their roles and sizes, and the front."""

from __future__ import annotations

import math
from dataclasses import dataclass

from strata.server.replicas.routers import ROUTERS


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 2
    # 0: every replica prefills and decodes. P > 0: replicas 0..P-1 only prefill and hand
    # the KV to the other replicas, which only decode (P:D = P : replicas - P).
    prefill_replicas: int = 0
    router: str = "kv-aware"  # a name in strata/server/replicas/routers.py ROUTERS
    blocks_per_replica: int = 4096
    block_size: int = 16
    max_batched_tokens: int = 2048  # the engine's per-step token budget
    max_seqs: int = 256
    # Seconds a request spends outside the engine's steps before a replica sees it: HTTP,
    # the front, the hop to the replica, tokenizing (measured: replicas_routing --probes).
    request_overhead_s: float = 0.0
    # A prefill replica's KV reaches a decode replica after base + per block seconds.
    transfer_base_s: float = 0.0
    transfer_s_per_block: float = 0.0
    # Closed loop: at most this many requests outstanding, the next sent when one ends (as
    # benchmarks/replicas_routing.py's --concurrency). 0: open loop, sent at arrival_s.
    concurrency: int = 0

    def __post_init__(self) -> None:
        for name in ("replicas", "blocks_per_replica", "block_size", "max_batched_tokens",
                     "max_seqs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"SimConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.prefill_replicas < self.replicas:
            raise ValueError(
                f"prefill_replicas must be in [0, replicas) so that some replica decodes, "
                f"got {self.prefill_replicas} of {self.replicas}"
            )
        ROUTERS.check(self.router)
        for name in ("request_overhead_s", "transfer_base_s", "transfer_s_per_block"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"SimConfig.{name} must be a finite number >= 0, got {value}")
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be >= 0 (0: open loop), got {self.concurrency}")

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0

    @property
    def pd_label(self) -> str:
        if not self.disaggregated:
            return "colocated"
        return f"{self.prefill_replicas}:{self.replicas - self.prefill_replicas}"
