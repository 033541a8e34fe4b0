"""Request arrival times for an open-loop load test: Poisson, or gamma for bursts.

Inter-arrival gaps are gamma distributed with shape B (the burstiness) and scale
1 / (R * B), so the mean gap is 1 / R for every B. B = 1 is exponential gaps (a Poisson
process); B < 1 bunches requests into bursts separated by long pauses, as in the BurstGPT
traces; B > 1 spaces them more evenly. R = inf sends every request at time 0.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float, seed: int
) -> list[float]:
    """Seconds from the start at which each request is sent; non-decreasing, first one 0.

    The same (num_requests, request_rate, burstiness, seed) gives the same offsets.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"the request rate must be > 0 (or inf), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"the burstiness must be a finite number > 0, got {burstiness}")
    if num_requests == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    gaps[0] = 0.0  # the run starts with its first request
    return np.cumsum(gaps).tolist()


def rate_label(rate: float) -> str:
    """A request rate as the command line writes it: 4, 0.5 or inf."""
    return "inf" if math.isinf(rate) else f"{rate:g}"
