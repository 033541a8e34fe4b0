"""Tier operations rank 0 sends to the other tensor-parallel ranks, and how a rank runs them.

Under tensor parallelism every rank keeps its own tiers, holding its own KV heads. Rank 0's
scheduler alone decides what is stored, loaded, held and released; each decision travels
to the other ranks as a `TierOp`, on the same ordered channel as the steps, so every rank
applies it between the same two steps:

    rank 0:  TierManager call ─► its own tiers
                     └──────────► TierOp ─► rank r: run_tier_op ─► its own tiers
    LoadOp ─► rank r loads synchronously, replies how many leading blocks arrived
    rank 0:  LoadDone(seq, min over every rank)   a block any rank lacks is a miss for all

Rank r's key for a block is `rank_key(rank 0's key, r)`: rank 0's key names the model and
the parallel layout (`.../tpNr0`), so rank r's names them too, plus the rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from strata.kv.prefix import BlockRef
from strata.kv.tiers.jobs import LoadDone
from strata.kv.tiers.manager import TierManager

WAIT_S = 0.05  # how often a rank waiting for its load checks the mover's reports


@dataclass(frozen=True)
class StoreOp:
    """Write pool blocks `block_ids` (computed by the last step) through to the tiers."""

    blocks: tuple[BlockRef, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class LoadOp:
    """Load `blocks` into pool blocks `block_ids`; the rank replies how many arrived."""

    seq_id: str
    blocks: tuple[BlockRef, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class HoldOp:
    owner: str
    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class ReleaseOp:
    owner: str


@dataclass(frozen=True)
class FlushOp:
    """Finish every queued store and write-through; the rank replies once done."""


TierOp: TypeAlias = StoreOp | LoadOp | HoldOp | ReleaseOp | FlushOp


def reply_key(op: TierOp) -> str | None:
    """The key a rank's reply to `op` is filed under at rank 0; None: no reply."""
    if isinstance(op, LoadOp):
        return f"load:{op.seq_id}"
    if isinstance(op, FlushOp):
        return "flush"
    return None


class TierPeers(Protocol):
    """The other ranks' tiers, as rank 0 sees them (strata/engine/tp implements it)."""

    def send(self, op: TierOp) -> None:
        """Queue `op` for every other rank, after everything sent before it."""

    def replies(self, key: str) -> list[int]:
        """Every other rank's reply to the op filed under `key` (waits for them)."""


def rank_key(key: bytes, rank: int) -> bytes:
    """Rank `rank`'s key for the block rank 0 keys `key` (rank 0 keeps its own)."""
    if rank == 0:
        return key
    return hashlib.sha256(key + b"\0tp-rank\0" + str(rank).encode()).digest()


def _refs(blocks: Sequence[BlockRef], rank: int) -> list[BlockRef]:
    return [BlockRef(rank_key(b.key, rank), b.token_ids, b.position) for b in blocks]


def run_tier_op(tiers: TierManager, op: TierOp, rank: int, after: Any = None) -> int | None:
    """Apply rank 0's `op` to this rank's tiers; the reply, if the op has one.

    `after` (a CUDA event) orders a store behind the step that computed the blocks."""
    if isinstance(op, StoreOp):
        tiers.store(_refs(op.blocks, rank), op.block_ids, after=after)
    elif isinstance(op, LoadOp):
        return _load(tiers, op, rank)
    elif isinstance(op, HoldOp):
        tiers.hold(op.owner, [rank_key(k, rank) for k in op.keys])
    elif isinstance(op, ReleaseOp):
        tiers.release(op.owner)
    else:
        tiers.flush()
        return 0
    return None


def _load(tiers: TierManager, op: LoadOp, rank: int) -> int:
    """Load synchronously: the blocks are in this rank's pool before its next step."""
    for block_id in op.block_ids:
        tiers.before_overwrite(block_id)
    tiers.start_load(op.seq_id, _refs(op.blocks, rank), op.block_ids)
    while True:
        for event in tiers.poll():
            if isinstance(event, LoadDone) and event.seq_id == op.seq_id:
                return event.num_loaded
        tiers.wait(WAIT_S)
