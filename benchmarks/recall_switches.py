"""The recall step's A/B switches, by name, for the benchmarks and the GPU check: each is
a class (or module) attribute of the engine that picks between a new path and the one
before it, process-wide.

    set_arm(name, on)        turn a switch on or off
    engine_default(name)     what the engine has now
    with switched(name, on): for a block, then back as it was
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

ARMS = {  # switch: what "on" means (off: what came before it)
    "side_streams": "recall decode rows of several sequences on CUDA side streams",
    "dense_kernel": "recall steps' dense layers decode by the split-K Triton kernel and RoPE "
                    "in one kernel (off: batched matmuls and torch RoPE)",
    "step_graphs": "a recall decode step whose rows repeat replays one CUDA graph of the "
                   "whole forward (off: eager around per-layer page graphs)",
    "rebuild_kernel": "shadowkv rebuilds fetched blocks' keys into the working set in one "
                      "Triton kernel a layer (off: about 25 torch kernels)",
    "update_kernel": "the working set's update in one Triton kernel a layer (off: about "
                     "45 torch kernels)",
    "fetch_kernel": "the moved blocks' host rows copied by one kernel that works out their "
                    "indices (off: about 10 index kernels, then the copy)",
    "attention_kernel": "a page's decode attention reads sink, working set and tail in place "
                        "in one Triton kernel and its merge (off: concatenated, masked)",
    "fetch_stream": "a page's values are fetched on a side stream while its keys are "
                    "rebuilt (shadowkv) or copied (off: one after the other)",
    "scores_kernel": "the policies' block scores (softmax over the summaries, maxima) in one "
                     "Triton kernel a layer (off: about ten torch kernels)",
    "block_mass": "clusterkv and pqcache score a block by the sum of its tokens' estimated "
                  "attention shares (off: its best token's), by torch ops on CUDA too",
}  # fmt: skip
# arms that set the attributes of several others (not reported by row)
COMBINED = {"recall_kernels": ("scores_kernel", "update_kernel", "fetch_kernel",
                               "rebuild_kernel", "attention_kernel")}  # fmt: skip
ARMS.update({name: f"{', '.join(parts)} together" for name, parts in COMBINED.items()})


def switches() -> dict[str, tuple[tuple[Any, str], ...]]:
    """Each switch of ARMS: the attributes it sets."""
    from strata.kv.recall import fetch
    from strata.kv.recall.attention import RecallAttention
    from strata.kv.recall.clusterkv import ClusterKVPolicy
    from strata.kv.recall.page_decode import PageDecoder
    from strata.kv.recall.policy import RecallPolicy
    from strata.kv.recall.pqcache import PQCachePolicy
    from strata.kv.recall.sequence import RecallSequence
    from strata.kv.recall.shadowkv import ShadowKVPolicy
    from strata.kv.recall.step_graphs import RecallStepGraphs
    from strata.kv.recall.working_set import WorkingSet

    table: dict[str, tuple[tuple[Any, str], ...]] = {
        "side_streams": ((RecallAttention, "side_streams"),),
        "dense_kernel": ((RecallSequence, "dense_kernel"), (RecallAttention, "fused_rope")),
        "step_graphs": ((RecallStepGraphs, "enabled"),),
        "rebuild_kernel": ((ShadowKVPolicy, "rebuild_kernel"),),
        "update_kernel": ((WorkingSet, "update_kernel"),),
        "fetch_kernel": ((fetch, "fetch_kernel"),),
        "attention_kernel": ((PageDecoder, "attention_kernel"),),
        "scores_kernel": ((RecallPolicy, "scores_kernel"),),
        "fetch_stream": ((PageDecoder, "fetch_stream"),),
        "block_mass": ((ClusterKVPolicy, "block_mass"), (PQCachePolicy, "block_mass")),
    }
    for name, parts in COMBINED.items():
        table[name] = tuple(owner for part in parts for owner in table[part])
    return table


def set_arm(name: str, on: bool) -> None:
    for owner, attribute in switches()[name]:
        setattr(owner, attribute, on)


def engine_default(name: str) -> bool:
    owner, attribute = switches()[name][0]
    return bool(getattr(owner, attribute))


@contextlib.contextmanager
def switched(name: str, on: bool) -> Iterator[None]:
    was = engine_default(name)
    set_arm(name, on)
    try:
        yield
    finally:
        set_arm(name, was)
