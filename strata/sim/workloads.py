"""Workloads for the simulator: BurstGPT-shaped arrivals and lengths, shared system prompts
and multi-turn chat.

BurstGPT (Wang et al., "BurstGPT: A Real-World Workload Dataset to Optimize LLM Serving
Systems", arXiv:2401.17644; traces of Azure OpenAI GPT services) finds request
inter-arrival times Gamma distributed, burstier than Poisson (shape < 1), and request and
response lengths Zipf-like. Its workload generator (github.com/HPMLL/BurstGPT,
example/src/burstgpt/config.py) draws gaps from Gamma(shape 0.5) and lengths from
Zipf(a = 1.1) below 1024 tokens; those are the defaults of BurstGPTShape. Gaps use
strata.bench.arrivals (scale 1 / (rate * shape): the mean gap is 1 / rate for every shape,
the coefficient of variation 1 / sqrt(shape)).

Content: segment ids say which text a span is (system prompt k, user u's turn t, ...);
equal ids are equal tokens, so requests with the same system prompt share its blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strata.bench.arrivals import arrival_offsets
from strata.sim.request import SimRequest, segment_keys, token_keys

# Segment id spaces: a system prompt, a user message, an answer.
_SYSTEM, _USER, _ANSWER = 1 << 40, 2 << 40, 3 << 40


@dataclass(frozen=True)
class BurstGPTShape:
    gamma_shape: float = 0.5  # of inter-arrival gaps (< 1: bursts)
    zipf_a: float = 1.1  # of user-message and answer lengths
    max_len: int = 1024  # lengths are drawn again until below this

    def __post_init__(self) -> None:
        if not (self.gamma_shape > 0 and math.isfinite(self.gamma_shape)):
            raise ValueError(f"gamma_shape must be a finite number > 0, got {self.gamma_shape}")
        if not self.zipf_a > 1:
            raise ValueError(f"zipf_a must be > 1 (numpy's Zipf), got {self.zipf_a}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")

    def lengths(self, rng: np.random.Generator, n: int) -> list[int]:
        out = rng.zipf(self.zipf_a, size=n)
        while (bad := out >= self.max_len).any():
            out[bad] = rng.zipf(self.zipf_a, size=int(bad.sum()))
        return [int(v) for v in out]


@dataclass(frozen=True)
class ChatWorkload:
    """Sessions arrive BurstGPT-shaped at `rate` per second; each opens with one of
    `systems` system prompts (popularity Zipf-like: rank k weighs 1 / k**system_skew) and
    runs `turns` turns (1: single requests). Turn t's prompt is the whole conversation so
    far plus a new user message; it is sent `think_s` (exponential mean) after turn t-1's
    answer ends."""

    sessions: int = 100
    rate: float = 1.0
    turns: int = 1
    systems: int = 8
    system_len: int = 256
    system_skew: float = 1.0
    think_s: float = 5.0
    shape: BurstGPTShape = BurstGPTShape()

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "systems", "system_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ChatWorkload.{name} must be >= 1, got {getattr(self, name)}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not (self.system_skew >= 0 and self.think_s >= 0):
            raise ValueError("system_skew and think_s must be >= 0")

    def requests(self, seed: int, block_size: int) -> list[SimRequest]:
        rng = np.random.default_rng(seed)
        starts = arrival_offsets(self.sessions, self.rate, self.shape.gamma_shape, seed)
        weights = 1.0 / np.arange(1, self.systems + 1) ** self.system_skew
        picks = rng.choice(self.systems, size=self.sessions, p=weights / weights.sum())
        out: list[SimRequest] = []
        for s in range(self.sessions):
            history = [(_SYSTEM + int(picks[s]), self.system_len)]
            users = self.shape.lengths(rng, self.turns)
            answers = self.shape.lengths(rng, self.turns)
            for t in range(self.turns):
                history.append((_USER + s * self.turns + t, users[t]))
                prompt_len = sum(n for _, n in history)
                full = [*history, (_ANSWER + s * self.turns + t, answers[t])]
                first = t == 0
                out.append(SimRequest(
                    len(out), starts[s] if first else float(rng.exponential(self.think_s)),
                    prompt_len, answers[t], segment_keys(full, block_size),
                    None if first else len(out) - 1,
                ))  # fmt: skip
                history = full
        return out


def shared_prefix_requests(
    prompts: Sequence[Sequence[int]], output_len: int, block_size: int
) -> list[SimRequest]:
    """Requests of real prompt token ids, all due at time 0 (a closed-loop client paces
    them), `output_len` tokens each: benchmarks/replicas_routing.py's workload."""
    out = []
    for i, ids in enumerate(prompts):
        answer = [-(i + 1)] * output_len  # a distinct answer per request
        out.append(SimRequest(i, 0.0, len(ids), output_len,
                              token_keys([*ids, *answer], block_size)))  # fmt: skip
    return out
