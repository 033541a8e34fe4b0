"""Simulator: the discrete-event loop of a front and its replicas.

Events, in time order (ties in the order they were made, so a run is deterministic):

    send ──route──► enqueue (after request_overhead_s) ──► replica steps ... step end
                                                                   │ first token, finish
    prefill replica's step end ─► handoff ─(transfer)─► decode replica's queue

The front routes with the real router classes (ROUTERS): each sees, per replica, the
requests in flight (sent there and not yet ended or handed off), its KV use and how many
leading prompt blocks it holds. The real front learns the last two from reports polled
every 0.25 s; here it sees them at once.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from strata.server.replicas.routers import ROUTERS, Candidate, LeastLoaded
from strata.sim.config import SimConfig
from strata.sim.costs import StepCost
from strata.sim.replica import SimReplica, SimSeq
from strata.sim.request import SimRequest

SEND, ENQUEUE, STEP_END = 0, 1, 2


@dataclass
class SimResult:
    config: SimConfig
    seqs: list[SimSeq]  # in request id order
    end_s: float
    busy_s: list[float]  # per replica, seconds stepping
    decisions: dict[str, int] = field(default_factory=dict)  # router reason -> count


class Simulator:
    def __init__(self, config: SimConfig, cost: StepCost) -> None:
        self.config = config
        roles = ["prefill"] * config.prefill_replicas
        roles += ["decode" if config.disaggregated else "both"] * (
            config.replicas - config.prefill_replicas
        )
        # key -> replicas whose cache holds it: most replicas hold none of a prompt's
        # blocks, and this finds them without walking every cache (512 replicas).
        self.holders: dict[int, set[int]] = defaultdict(set)
        self.replicas = [
            SimReplica(i, cost, config.blocks_per_replica, config.block_size,
                       config.max_batched_tokens, config.max_seqs, role, self._listener(i))
            for i, role in enumerate(roles)
        ]  # fmt: skip
        self.front = [r for r in self.replicas if r.role != "decode"]
        self.back = [r for r in self.replicas if r.role == "decode"]
        self.router = ROUTERS.get(config.router)()
        self.decode_router = LeastLoaded()
        self.in_flight = [0] * config.replicas
        self.decisions: dict[str, int] = defaultdict(int)
        self._events: list[tuple[float, int, int, Any]] = []
        self._order = 0

    def _listener(self, replica: int) -> Callable[[int, bool], None]:
        def changed(key: int, stored: bool) -> None:
            if stored:
                self.holders[key].add(replica)
            else:
                held = self.holders[key]
                held.discard(replica)
                if not held:
                    del self.holders[key]

        return changed

    def _push(self, when: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (when, self._order, kind, payload))
        self._order += 1

    def run(
        self, requests: Sequence[SimRequest], progress: Callable[[int], None] | None = None
    ) -> SimResult:
        """Simulate until every request has ended; `progress(n)` after each n that end."""
        _check_requests(requests)
        followers: dict[int, list[SimRequest]] = defaultdict(list)
        for r in requests:
            if r.follows is not None:
                followers[r.follows].append(r)
        client = _Client(self.config.concurrency)
        for r in requests:
            if r.follows is None:
                self._push(r.arrival_s, SEND, r)
        seqs: dict[int, SimSeq] = {}
        now = 0.0
        while self._events:
            now, _, kind, payload = heapq.heappop(self._events)
            if kind == SEND:
                if client.admit(payload):
                    seqs[payload.id] = self._send(payload, now)
            elif kind == ENQUEUE:
                seq, replica = payload
                replica.enqueue(seq)
                self._start(replica, now)
            else:
                for seq in self._step_end(payload, now):
                    for r in followers.get(seq.request.id, ()):
                        self._push(now + r.arrival_s, SEND, r)
                    for r in client.release():
                        self._push(now, SEND, r)
                    if progress is not None:
                        progress(1)
        return SimResult(
            self.config, [seqs[r.id] for r in requests], now,
            [r.busy_s for r in self.replicas], dict(self.decisions),
        )  # fmt: skip

    def _send(self, request: SimRequest, now: float) -> SimSeq:
        seq = SimSeq(request, now)
        keys = request.prompt_keys(self.config.block_size)
        first = self.holders.get(keys[0], set()) if keys else set()
        candidates = [
            Candidate(r.index, self.in_flight[r.index], r.kv_use,
                      r.cache.match(keys) if r.index in first else 0)
            for r in self.front
        ]  # fmt: skip
        decision = self.router.choose(candidates, len(keys))
        self.decisions[decision.reason] += 1
        self.in_flight[decision.replica] += 1
        replica = self.replicas[decision.replica]
        self._push(now + self.config.request_overhead_s, ENQUEUE, (seq, replica))
        return seq

    def _start(self, replica: SimReplica, now: float) -> None:
        if replica.stepping:
            return
        seconds = replica.start_step()
        if seconds is not None:
            self._push(now + seconds, STEP_END, replica)

    def _step_end(self, replica: SimReplica, now: float) -> list[SimSeq]:
        """Apply a replica's step and start its next; the sequences that ended."""
        result = replica.end_step(now)
        self.in_flight[replica.index] -= len(result.finished)
        for seq in result.handed_off:
            self.in_flight[replica.index] -= 1
            self._hand_off(seq, now)
        self._start(replica, now)
        return result.finished

    def _hand_off(self, seq: SimSeq, now: float) -> None:
        candidates = [Candidate(r.index, self.in_flight[r.index], r.kv_use, 0) for r in self.back]
        target = self.replicas[self.decode_router.choose(candidates, 0).replica]
        self.in_flight[target.index] += 1
        blocks = -(-seq.prompt_len // self.config.block_size)
        delay = self.config.transfer_base_s + blocks * self.config.transfer_s_per_block
        self._push(now + delay, ENQUEUE, (seq, target))


class _Client:
    """Closed loop: at most `limit` requests outstanding (0: no limit); the rest wait, in
    the order they were due, for one to end."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.outstanding = 0
        self.backlog: list[SimRequest] = []

    def admit(self, request: SimRequest) -> bool:
        if self.limit and self.outstanding >= self.limit:
            self.backlog.append(request)
            return False
        self.outstanding += 1
        return True

    def release(self) -> list[SimRequest]:
        self.outstanding -= 1
        return [self.backlog.pop(0)] if self.backlog else []


def _check_requests(requests: Sequence[SimRequest]) -> None:
    ids = {r.id for r in requests}
    if len(ids) != len(requests):
        raise ValueError("request ids must be distinct")
    for r in requests:
        if r.follows is not None and r.follows not in ids:
            raise ValueError(f"request {r.id} follows {r.follows}, which is not in the workload")
