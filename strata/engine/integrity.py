"""The engine's integrity check: its parts agree with each other and with the requests
it tracks. Raises KVIntegrityError naming the first disagreement found."""

from __future__ import annotations

from collections.abc import Collection

from strata.engine.build import EngineParts
from strata.kv.manager import KVIntegrityError


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise KVIntegrityError(f"{what} check failed:\n  " + "\n  ".join(problems))


def check_engine_integrity(parts: EngineParts, tracked: Collection[str]) -> None:
    """`tracked`: the request ids the engine holds (queued, loading or running)."""
    kv, sched = parts.kv, parts.scheduler
    kv.check_integrity()
    if parts.moe is not None:
        parts.moe.check_integrity()
    if parts.kv_cache.tails is not None:
        _raise_if(parts.kv_cache.tails.check(), "KV tail")
    for seq in sched.running:
        table = kv.block_table(seq.request_id)
        if len(table) * kv.block_size < seq.num_kv_slots:
            raise KVIntegrityError(
                f"running {seq.request_id!r} has {seq.num_kv_slots} KV slots "
                f"but {len(table)} blocks"
            )
        hole_end = kv.hole_end(seq.request_id)  # blocks reused past a hole lie ahead
        if hole_end is not None and hole_end <= seq.num_computed:
            raise KVIntegrityError(
                f"running {seq.request_id!r} computed {seq.num_computed} tokens, past its "
                f"reused blocks from token {hole_end}"
            )
    for seq in sched.waiting:
        if kv.has(seq.request_id):
            raise KVIntegrityError(f"waiting {seq.request_id!r} holds blocks")
    if parts.recall is not None:
        problems = parts.recall.check_integrity()
        admitted = {  # running, or preempted (a recall sequence keeps its state then)
            s.request_id for s in (*sched.running, *sched.waiting)
            if s.recall is not None and s.recall.state is not None
        }
        if admitted != parts.recall.live_ids():
            problems.append(f"running recall sequences {admitted} != {parts.recall.live_ids()}")
        _raise_if(problems, "recall store")
    live = {s.request_id for s in (*sched.running, *sched.waiting, *sched.loading.values())}
    if live != set(tracked):
        raise KVIntegrityError(f"engine tracks {set(tracked)} but scheduler has {live}")
    if parts.tiers is not None and not sched.tier_loads.in_flight:
        parts.tiers.flush()
        _raise_if(parts.tiers.check_integrity(), "KV tier")
