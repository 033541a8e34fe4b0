"""Timing for the cost models measured at start-up (MoE offload, magicpig's samples)."""

from __future__ import annotations

import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], sync: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls of fn, each followed by sync (the device's,
    or nothing), after one call not timed."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
