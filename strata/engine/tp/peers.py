"""WorkerPeers: the workers, as rank 0's ShardedTierManager and KV policy driver see them.

Tier operations and compactions go to every worker on its step pipe (channel.send_op),
so each worker applies them in the order rank 0 made them, between the same steps. A worker answers
a load or a flush on the same pipe, ("tier", key, value), in the order it got them;
rank 0 files answers by key until the one it waits for arrives. A worker silent for
the group's timeout, or one that exits or reports an error, fails the group.

Once the group has stopped (the engine closed) or failed, operations go nowhere and
there are no answers: rank 0's own tiers are all that is left.
"""

from __future__ import annotations

import time

from strata.engine.tp.channel import WorkerOp, send_op
from strata.engine.tp.group import WorkerGroup

POLL_S = 0.2


class WorkerPeers:
    def __init__(self, group: WorkerGroup) -> None:
        self.group = group
        self._answers: list[dict[str, int]] = [{} for _ in group.conns]

    def send(self, op: WorkerOp) -> None:
        if not self.group.running:
            return
        with self.group.guard():
            send_op(self.group.conns, op)

    def replies(self, key: str) -> list[int]:
        if not self.group.running:
            return []
        with self.group.guard():
            return [self._answer(rank, key) for rank in range(1, len(self.group.conns) + 1)]

    def _answer(self, rank: int, key: str) -> int:
        answers = self._answers[rank - 1]
        conn, proc = self.group.conns[rank - 1], self.group.procs[rank - 1]
        deadline = time.monotonic() + self.group.timeout_s
        while key not in answers:
            if not conn.poll(POLL_S):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank} did not answer tier operation {key!r}")
                continue
            kind, *detail = conn.recv()
            if kind != "tier":
                raise RuntimeError(f"rank {rank} failed: {detail[0]}")
            answers[detail[0]] = detail[1]
        return answers.pop(key)
