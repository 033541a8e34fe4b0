"""What the TierManager's two threads are asked to do, and what they report back.

    engine thread --MoverJob--> mover thread (device <-> cpu)
    engine thread --IOJob-----> io thread (cpu <-> disk/remote) --LoadJob parts--> mover
    engine thread <--TierEvent-- either thread, through `TierManager.poll`

Jobs are immutable once queued. The one shared mutable piece is `LoadProgress`: the parts
of one load carry the same progress, and only the mover thread updates it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, TypeAlias

from strata.kv.prefix import BlockRef


@dataclass(frozen=True)
class _OfSequence:
    """A job or report about one sequence's blocks."""

    seq_id: str


@dataclass(frozen=True)
class _OfOwner:
    """A job about the cpu-tier pins that `owner` holds."""

    owner: str


@dataclass(frozen=True)
class LoadDone(_OfSequence):
    """`num_loaded` leading blocks of `seq_id`'s load are in the pool; the rest failed."""

    num_loaded: int


@dataclass(frozen=True)
class ProbeDone(_OfSequence):
    """Whether the remote tier holds each key probed for `seq_id`, in the probe's order."""

    found: tuple[bool, ...]


TierEvent: TypeAlias = LoadDone | ProbeDone


@dataclass
class LoadProgress:
    """One sequence's load, which may arrive in parts; reported once, when it ends."""

    seq_id: str
    loaded: int = 0  # leading blocks copied into the pool so far
    reported: bool = False


@dataclass(frozen=True)
class LoadJob:
    """Copy `blocks` into pool blocks `block_ids`; `last` ends the sequence's load.

    `pinned` are cpu-tier pins the job owns: dropped once the mover has copied.
    """

    progress: LoadProgress
    blocks: tuple[BlockRef, ...]
    block_ids: tuple[int, ...]
    pinned: tuple[bytes, ...] = ()
    last: bool = True


@dataclass(frozen=True)
class StoreJob:
    """Copy pool blocks `block_ids` into the cpu tier once `after` (a CUDA event) is done."""

    blocks: tuple[BlockRef, ...]
    block_ids: tuple[int, ...]
    after: Any  # torch.cuda.Event | None
    done: threading.Event  # set once the mover has read every block


@dataclass(frozen=True)
class HoldJob(_OfOwner):
    """Pin `keys` in the cpu tier for `owner` (those present when the mover gets here)."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class ReleaseJob(_OfOwner):
    """Drop every pin `owner` holds."""


@dataclass(frozen=True)
class ProbeJob(_OfSequence):
    """Ask the remote tier which of `keys` it holds, for `seq_id`."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class WriteJob:
    """Write `blocks` (pinned in the cpu tier) to the lower tiers; `backlog` blocks of the
    write backlog are given back when done."""

    blocks: tuple[BlockRef, ...]
    backlog: int


@dataclass(frozen=True)
class FenceJob:
    """Set `done` once every job queued before it on both threads has run: the mover
    passes it to the io thread behind the writes its stores queued (same priority, FIFO)."""

    done: threading.Event


@dataclass(frozen=True)
class StopJob:
    """Ends the thread that takes it."""


STOP = StopJob()

MoverJob: TypeAlias = StoreJob | LoadJob | HoldJob | ReleaseJob | FenceJob | StopJob
IOJob: TypeAlias = LoadJob | ProbeJob | WriteJob | FenceJob | StopJob
