"""What a RecallManager reports: its counters for stats() and /metrics, and the
problems check_integrity() finds (host slots, GPU bytes, pages and their rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strata.kv.recall.manager import RecallManager
    from strata.kv.recall.sequence import RecallSequence


def sequence_counters(state: RecallSequence) -> dict[str, float]:
    """A sequence's own counters (a released one's are kept in the manager's totals)."""
    ws = state.working_set
    return {
        "hits": int(ws.hits) if ws is not None else 0,
        "misses": int(ws.misses) if ws is not None else 0,
        "bytes_fetched": int(state.bytes_fetched),
        "bytes_prefetched": int(state.bytes_prefetched),
        "blocks_attended": int(state.blocks_attended),
        "decode_steps": state.decode_steps,
        "keys_sampled": state.sampled.keys,
        "sampled_on_host": state.sampled.on_host,
        "sampled_on_device": state.sampled.on_device,
        "sampled_host_seconds": state.sampled.host_seconds,
        "sampled_wait_seconds": state.sampled.wait_seconds,
    }


def recall_stats(m: RecallManager) -> dict[str, Any]:
    totals = dict(m.retired)
    for kv in m.live.values():
        if kv.state is not None:
            for name, value in sequence_counters(kv.state).items():
                totals[name] += value
    totals["graph_replays"] += sum(p.graphs.replays for p in m.pages if p.graphs)
    selected = totals["hits"] + totals["misses"]
    g = m.geometry
    per_step = totals["decode_steps"] * g.sparse_layers * g.num_kv_heads
    return {
        "recall_sequences": len(m.live),
        "recall_decode_steps": totals["decode_steps"],
        # middle blocks a decode step attends, per sparse layer and KV head
        "recall_blocks_attended_per_step": totals["blocks_attended"] / max(1, per_step),
        "recall_working_set_hit_rate": totals["hits"] / selected if selected else 0.0,
        "recall_working_set_hits": totals["hits"],
        "recall_working_set_misses": totals["misses"],
        "recall_bytes_fetched": totals["bytes_fetched"],
        **_sampling_stats(m, totals),
        **_prefetch_stats(m, totals["bytes_prefetched"]),
        # sparse layers of pages' decode steps replayed from CUDA graphs (layer_graphs.py)
        "recall_graph_replays": totals["graph_replays"],
        "recall_pages": len(m.pages),
        "recall_host_bytes_used": m.store.used_bytes,
        "recall_host_bytes": m.store.nbytes,
        # host bytes reserved for policies' own structures beside the store (magicpig)
        "recall_host_table_bytes_used": m.table_used,
        "recall_gpu_bytes_used": m.gpu_used,
        **_sharing_stats(m),
    }


def _sampling_stats(m: RecallManager, totals: dict[str, float]) -> dict[str, Any]:
    """A sampling policy's (magicpig) sampled keys per sparse layer and query head of the
    layers that sampled, and the share of those layers attended on the host."""
    layers = totals["sampled_on_host"] + totals["sampled_on_device"]
    per_layer = 1e3 / max(1, layers)
    return {
        "recall_keys_sampled_per_layer_head": totals["keys_sampled"]
        / max(1, layers * m.geometry.num_heads),
        "recall_sampled_on_host_share": totals["sampled_on_host"] / layers if layers else 0.0,
        # the host worker's time per sampled layer, and the engine thread's wait for it
        "recall_sampled_host_ms_per_layer": totals["sampled_host_seconds"] * per_layer,
        "recall_sampled_wait_ms_per_layer": totals["sampled_wait_seconds"] * per_layer,
    }


def _prefetch_stats(m: RecallManager, moved: float) -> dict[str, Any]:
    """The cross-layer prefetch's share of each sparse layer's picks it had guessed
    (precision, equal to recall: it guesses as many blocks as a layer picks), by model
    layer, and overall; and the bytes it moved."""
    counts = m.retired_prefetch.clone()
    for kv in m.live.values():
        if kv.state is not None:
            counts += kv.state.prefetch_counts.cpu()
    right, picks = counts[0], counts[1]
    dense = m.geometry.dense_layers
    return {
        "recall_prefetch_bytes": int(moved),
        "recall_prefetch_precision": int(right.sum()) / max(1, int(picks.sum())),
        "recall_prefetch_precision_per_layer": {
            dense + s: int(right[s]) / int(picks[s]) for s in range(len(picks)) if picks[s]
        },
    }


def _sharing_stats(m: RecallManager) -> dict[str, float]:
    store = m.store
    return {
        # prompt blocks sequences reused from the store at admission (not computed)
        "recall_prefix_blocks_reused": m.blocks_reused,
        "recall_prefix_blocks_published": m.blocks_published,
        "recall_prefix_blocks_indexed": len(store.index),
        "recall_host_slots_shared": store.num_shared,  # held by two sequences or more
        "recall_host_bytes_cached": store.cached_bytes,  # published, unheld: evictable
        "recall_host_slots_evicted": store.num_evicted,
    }


def integrity_problems(m: RecallManager) -> list[str]:
    """The store's own problems, then the manager's: GPU bytes counted against those held,
    pages, and each live sequence's host slots against the store's owners."""
    problems = m.store.check_integrity()
    dense = sum(m.geometry.dense_bytes(kv.max_tokens) for kv in m.live.values())
    used = dense + sum(page.nbytes for page in m.pages)
    if used != m.gpu_used:
        problems.append(f"recall GPU bytes: {m.gpu_used} counted, {used} held")
    tables = sum(kv.table_bytes for kv in m.live.values())
    if tables != m.table_used:
        problems.append(f"recall host table bytes: {m.table_used} counted, {tables} held")
    problems += _page_problems(m)
    for request_id, kv in m.live.items():
        state = kv.state
        slots = [] if state is None else state.key_slots + state.value_slots
        if sorted(m.store.owned(request_id)) != sorted(slots):
            problems.append(f"recall sequence {request_id!r} holds the wrong host slots")
    stray = m.store.owners() - set(m.live)
    if stray:
        problems.append(f"host slots held by no live recall sequence: {sorted(stray)}")
    return problems


def _page_problems(m: RecallManager) -> list[str]:
    """Every page holds a row, and each row's owner is a live sequence of that row."""
    problems = []
    for page in m.pages:
        if page.empty:
            problems.append(f"recall page {page.key} holds no row")
        for row, owner in enumerate(page.owners):
            kv = m.live.get(owner) if owner is not None else None
            state = kv.state if kv is not None else None
            if owner is not None and (state is None or (state.page, state.row) != (page, row)):
                problems.append(f"recall page {page.key}: row {row} of {owner!r}, not there")
    return problems
