"""RecallMirror: a tensor-parallel worker's recall store, following rank 0's.

The worker's RecallManager is sized as rank 0's (as many host slots, the same GPU
budget) over the worker's own KV heads. It decides nothing:

    a step's row (wire.py)   a serial it does not hold is admitted from the row's numbers;
                             the chunk is planned by the worker's own RecallSequence, and
                             must equal rank 0's (the plan follows from token counts alone)
    release(serial)          rank 0 released it (finish, abort), before the next step

Rank 0 admits a sequence before its first step and releases it before any step that
follows, so the worker's live sequences are always among rank 0's: its store cannot run
short where rank 0's did not. A sequence rank 0 released before it ever ran is unknown
here, and its release a no-op. Host slot numbers are the worker's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strata.kv.recall.attention import RecallRows
from strata.kv.recall.manager import RecallManager
from strata.kv.recall.sequence import RecallSequence
from strata.kv.recall.wire import WireRow, decode_rows


@dataclass(frozen=True)
class RecallRelease:
    """Rank 0 released recall sequence `serial`: the workers release theirs."""

    serial: int


def mirror_id(serial: int) -> str:
    return f"#{serial}"


class RecallMirror:
    def __init__(self, manager: RecallManager) -> None:
        self.manager = manager

    def rows(self, data: np.ndarray) -> tuple[RecallRows, ...]:
        """The step's recall rows, each sequence admitted if new and its chunk planned."""
        out = []
        for row in decode_rows(data):
            state = self._state(row)
            chunk = state.plan(row.chunk.start, row.chunk.end)
            if chunk != row.chunk:
                raise RuntimeError(
                    f"recall sequence {row.serial}: this rank planned {chunk}, rank 0 {row.chunk}"
                )
            out.append(RecallRows(state, chunk, row.first_row))
        return tuple(out)

    def release(self, op: RecallRelease) -> None:
        self.manager.release(mirror_id(op.serial))

    def _state(self, row: WireRow) -> RecallSequence:
        request_id = mirror_id(row.serial)
        manager = self.manager
        state = manager.state_of(request_id)
        if state is not None:
            return state
        kv = manager.kv_for(row.policy, row.budget_blocks, row.max_tokens, row.host_blocks,
                            row.prompt_tokens)  # fmt: skip
        admitted = manager.admit(request_id, kv, row.serial, capacity=row.page_rows)
        if not admitted or kv.state is None:
            raise RuntimeError(
                f"recall sequence {row.serial}: rank 0 admitted it, this rank has no room"
            )
        return kv.state
