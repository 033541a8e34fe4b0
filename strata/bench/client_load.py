"""How busy the load generator itself was during a run of `strata bench serve`.

The client times every chunk on its own event loop. When that loop is busy (parsing
hundreds of streams), a chunk that has arrived waits for the loop, a request due to be
sent waits too, and the wait is counted as the server's latency. A task that sleeps a
fixed interval and times how late it wakes measures that wait: the loop's lag. Its p99
and maximum, with the client's CPU time, say how far the timings can be trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LAG_INTERVAL_S = 0.005
# A p99 lag above this is reported as a client that may have set the pace.
LAG_WARN_MS = 10.0


class LagMonitor:
    """Samples an event loop's lag while running: `async with LagMonitor() as m`."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = self._wall0 = 0.0
        self.cpu_s = self.wall_s = 0.0

    async def _sample(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.lags_ms.append(max(0.0, time.perf_counter() - before - LAG_INTERVAL_S) * 1e3)

    async def __aenter__(self) -> LagMonitor:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None  # picklable again: a worker process sends its monitor back
        self.cpu_s = time.process_time() - self._cpu0
        self.wall_s = time.perf_counter() - self._wall0


@dataclass(frozen=True)
class ClientLoad:
    """The load generator over one run: `processes` event loops (one per process), their
    CPU seconds together, the run's wall time, and the loops' lag p99 and maximum."""

    processes: int
    cpu_s: float
    wall_s: float
    lag_p99_ms: float
    lag_max_ms: float

    @classmethod
    def of(cls, monitors: Sequence[LagMonitor]) -> ClientLoad:
        lags = [lag for m in monitors for lag in m.lags_ms] or [0.0]
        return cls(
            processes=len(monitors),
            cpu_s=sum(m.cpu_s for m in monitors),
            wall_s=max(m.wall_s for m in monitors),
            lag_p99_ms=float(np.percentile(lags, 99)),
            lag_max_ms=max(lags),
        )

    @property
    def cpu_share(self) -> float:
        """CPU seconds per second of the run, per process: near 1 is a saturated client."""
        return self.cpu_s / (self.wall_s * self.processes) if self.wall_s > 0 else 0.0

    @property
    def lagged(self) -> bool:
        return self.lag_p99_ms > LAG_WARN_MS

    def describe(self) -> str:
        plural = "es" if self.processes > 1 else ""
        text = (
            f"{self.processes} process{plural}, CPU {self.cpu_share:.0%} of a core each, "
            f"loop lag p99 {self.lag_p99_ms:.1f} ms, max {self.lag_max_ms:.1f} ms"
        )
        if self.lagged:
            text += "   <-- THE CLIENT LAGGED: its delays are in the latencies (--client-processes)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "processes": self.processes, "cpu_s": self.cpu_s, "wall_s": self.wall_s,
            "cpu_share": self.cpu_share, "lag_p99_ms": self.lag_p99_ms,
            "lag_max_ms": self.lag_max_ms, "lagged": self.lagged,
        }  # fmt: skip
