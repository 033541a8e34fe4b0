"""Multi-round chat: many users, each a growing conversation, through a GPU pool too
small to keep them all; tiers off against the cpu tier, with and without session pins.

Closed loop: `concurrency` turns in flight; when a user's turn ends, its next turn (the
conversation so far + the answer + a new message) queues behind every other user's, so
by the time it runs the pool has cycled through the other conversations:

    queue: u0.t0 u1.t0 ... uN.t0 | u0.t1 u1.t1 ... | ...      (round robin over users)

TTFT is from queueing a turn to the step that sampled its first token.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from strata.bench.tiers_measure import flush, summary_stats, sync
from strata.bench.tiers_workloads import ChatWorkload
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams

ChatMode = Literal["tiers-off", "cpu", "cpu+sessions"]
MODES: tuple[ChatMode, ...] = get_args(ChatMode)


@dataclass
class ChatResult:
    mode: str
    ttft_ms: list[list[float]]  # [turn][user]
    total_s: float
    answers: list[list[list[int]]]  # [user][turn] -> answer ids
    stats: dict[str, Any] = field(default_factory=dict)

    def turn_summary(self) -> list[dict[str, float]]:
        out = []
        for t, values in enumerate(self.ttft_ms):
            arr = np.asarray(values)
            out.append(
                {
                    "turn": t + 1,
                    "mean_ms": float(arr.mean()),
                    "p50_ms": float(np.percentile(arr, 50)),
                    "p90_ms": float(np.percentile(arr, 90)),
                }
            )
        return out

    def overall(self) -> dict[str, float]:
        arr = np.asarray([v for turn in self.ttft_ms for v in turn])
        return {
            "mean_ms": float(arr.mean()),
            "p50_ms": float(np.percentile(arr, 50)),
            "p90_ms": float(np.percentile(arr, 90)),
        }

    def row(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "total_s": self.total_s,
            "overall": self.overall(),
            "turns": self.turn_summary(),
            "ttft_ms": self.ttft_ms,
            "stats": self.stats,
        }


@dataclass
class _Turn:
    user: int
    turn: int
    sent: float
    first: float | None = None


def run_chat(
    llm: LLM, workload: ChatWorkload, mode: str, concurrency: int, session_ttl_s: float
) -> ChatResult:
    engine = llm.engine
    users, turns = workload.num_users, workload.num_turns
    history = [list(workload.messages[u][0]) for u in range(users)]
    ttft: list[list[float]] = [[] for _ in range(turns)]
    answers: list[list[list[int]]] = [[] for _ in range(users)]
    ready = deque(range(users))
    in_flight: dict[str, _Turn] = {}
    before = summary_stats(llm)
    sync(llm)
    start = time.perf_counter()
    while ready or in_flight:
        while ready and len(in_flight) < concurrency:
            u = ready.popleft()
            t = len(answers[u])
            sessions = mode == "cpu+sessions"
            params = SamplingParams(
                max_tokens=workload.answer_len, temperature=0, ignore_eos=True,
                session_id=f"user{u}" if sessions else None,
                cache_ttl_s=session_ttl_s if sessions else None,
            )  # fmt: skip
            request_id = engine.add_request(history[u], params)
            in_flight[request_id] = _Turn(u, t, time.perf_counter())
        for out in engine.step():
            turn = in_flight.get(out.request_id)
            if turn is None:
                continue
            if out.error is not None:
                raise RuntimeError(f"chat turn failed: {out.error}")
            if turn.first is None and out.token_ids:
                turn.first = time.perf_counter()
            if out.finished:
                del in_flight[out.request_id]
                assert turn.first is not None
                ttft[turn.turn].append((turn.first - turn.sent) * 1e3)
                answers[turn.user].append(list(out.token_ids))
                history[turn.user] += out.token_ids
                if turn.turn + 1 < turns:
                    history[turn.user] += workload.messages[turn.user][turn.turn + 1]
                    ready.append(turn.user)
    sync(llm)
    total = time.perf_counter() - start
    flush(llm)
    after = summary_stats(llm)
    stats = {k: v if k.endswith("_per_s") else v - before.get(k, 0) for k, v in after.items()}
    return ChatResult(mode, ttft, total, answers, stats)


def count_mismatches(result: ChatResult, reference: ChatResult) -> int:
    """Answers (user, turn) that differ from the reference run's."""
    return sum(
        a != b
        for mine, ref in zip(result.answers, reference.answers, strict=True)
        for a, b in zip(mine, ref, strict=True)
    )
