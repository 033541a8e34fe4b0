"""Building the recall store: its host slab, GPU budget and geometry, logged."""

from __future__ import annotations

import logging
import os

import torch

from strata.attention.layer_inputs import Rotary
from strata.config import CacheConfig, ModelConfig
from strata.kv.recall.geometry import SINK_BLOCKS, WINDOW_BLOCKS, RecallGeometry
from strata.kv.recall.host_attention_cost import host_attention_cost
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.manager import RecallManager
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.registry import is_recall_policy
from strata.kv.sizing import GIB, format_bytes

logger = logging.getLogger("strata.recall")

DEFAULT_HOST_FRACTION = 0.25  # of the machine's RAM, when the default policy is a recall one


def recall_enabled(cache: CacheConfig) -> bool:
    return is_recall_policy(cache.kv_policy) or cache.recall.host_memory is not None


def recall_gpu_share(cache: CacheConfig) -> float:
    """The share of the KV budget recall sequences get unless kv_recall_gpu_memory is set."""
    return 0.5 if is_recall_policy(cache.kv_policy) else 0.25


def host_bytes(cache: CacheConfig) -> int:
    if cache.recall.host_memory is not None:
        return int(cache.recall.host_memory * GIB)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * DEFAULT_HOST_FRACTION)


def recall_geometry(cache: CacheConfig, model: ModelConfig, dtype: torch.dtype) -> RecallGeometry:
    return RecallGeometry(
        model.num_layers, min(cache.recall.dense_layers, model.num_layers), model.num_heads,
        model.num_kv_heads, model.head_dim, cache.block_size, dtype,
        landmark_tokens=cache.recall.landmark_tokens,
        quest_page_tokens=cache.recall.quest_page_tokens or 0,
        working_set_factor=cache.recall.working_set_factor, prefetch=cache.recall.prefetch,
    )  # fmt: skip


def sharing_off_reason(
    cache: CacheConfig, geometry: RecallGeometry, tensor_parallel: bool
) -> str | None:
    """Why recall sequences do not share prompt blocks in the store, or None if they do
    (prefix_sharing.py)."""
    if not cache.enable_prefix_caching:
        return "prefix caching is off"
    if not geometry.sparse_layers:
        return "every layer is dense: the store holds no block"
    if tensor_parallel:
        return (
            "tensor parallelism: the workers mirror rank 0's admissions by serial, and their "
            "stores hold no index of their own slots"
        )
    return None


def recall_slots(
    cache: CacheConfig, whole: ModelConfig, dtype: torch.dtype, tensor_parallel: bool = False
) -> int:
    """Slots of the recall store (a block's keys, or its values: host_store.py):
    kv_recall_host_memory over a slot of the whole model, which spans every layer when
    prefixes are shared. A tensor-parallel rank's store holds as many, of its own KV
    heads (its share of the memory; a replicated head counts on every rank holding it)."""
    geometry = recall_geometry(cache, whole, dtype)
    return _num_slots(cache, geometry, sharing_off_reason(cache, geometry, tensor_parallel) is None)


def _num_slots(cache: CacheConfig, geometry: RecallGeometry, shared: bool) -> int:
    slot_bytes = geometry.host_slot_bytes(shared)
    num_slots = host_bytes(cache) // slot_bytes if geometry.sparse_layers else 1
    if geometry.sparse_layers and num_slots < 2:
        raise ValueError(
            f"kv_recall_host_memory holds no block: one takes {format_bytes(2 * slot_bytes)}"
        )
    return num_slots


def build_recall(
    cache: CacheConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device,
    gpu_bytes: int, rope: Rotary | None = None, graphs: bool = True,
    num_slots: int | None = None, shard: HeadShard | None = None,
    prefix_root: bytes | None = None,
) -> RecallManager:  # fmt: skip
    """The recall store for this engine (call only when recall_enabled) over `model`'s KV
    heads (a rank's, under tensor parallelism). graphs: capture selecting decode steps
    in CUDA graphs (on CUDA). num_slots: recall_slots of the whole model (default: of
    `model`). shard: this tensor-parallel rank's heads; a replicated head's selection then
    joins its ranks (ranks.py), outside CUDA graphs. prefix_root: the engine's block-key
    root; with it (and prefix caching on, not tensor-parallel) sequences share prompt
    blocks in the store, whose slots then span every layer."""
    if cache.kv_cache_dtype != "auto":
        raise ValueError(
            f"the recall store keeps blocks in the model dtype: use kv_cache_dtype 'auto', "
            f"not {cache.kv_cache_dtype!r}, with a recall policy"
        )
    geometry = recall_geometry(cache, model, dtype)
    graphs = graphs and (shard is None or shard.replicas == 1)
    off = sharing_off_reason(cache, geometry, shard is not None)
    if prefix_root is None:
        off = off or "no block-key root given"
    if num_slots is None:
        num_slots = _num_slots(cache, geometry, off is None)
    store = HostKVStore(
        num_slots, geometry.host_layers(off is None), model.num_kv_heads, cache.block_size,
        model.head_dim, dtype, pin=device.type == "cuda",
    )  # fmt: skip
    logger.info(
        "recall store: %s of %s host memory = keys and values of %d blocks (%d tokens; "
        "shadowkv gives a sequence's keys back once fitted); %s of %s memory for recall "
        "sequences; %d dense layers, sink %d + window %d tokens + the open block on "
        "the %s in the other %d; default policy %s; working sets of %d slots per picked "
        "block; selecting decode steps %s, up to %d sequences of a kind per page; each "
        "layer's picks %s; prompt prefixes %s",
        format_bytes(store.nbytes), "pinned" if device.type == "cuda" else "pageable",
        num_slots // 2, num_slots // 2 * cache.block_size, format_bytes(gpu_bytes), device.type,
        geometry.dense_layers, SINK_BLOCKS * cache.block_size, WINDOW_BLOCKS * cache.block_size,
        device.type, geometry.sparse_layers, cache.kv_policy, geometry.working_set_factor,
        "in CUDA graphs per layer" if graphs and device.type == "cuda" else "eager",
        cache.recall.page_rows,
        "guessed and fetched a layer early (--kv-recall-prefetch)" if geometry.prefetch
        else "fetched when the layer runs",
        "shared (published blocks keep every layer; unheld ones stay cached until evicted)"
        if off is None else f"not shared ({off})",
    )  # fmt: skip
    if cache.kv_policy == "magicpig":
        _log_sampling(geometry, device)
    return RecallManager(
        geometry, store, gpu_bytes, device, rope, graphs, shard, cache.recall.page_rows,
        prefix_root if off is None else None,
    )  # fmt: skip


def _log_sampling(geometry: RecallGeometry, device: torch.device) -> None:
    """Measure the host's attention rate now (host_attention_cost.py), and say what
    magicpig's tables take."""
    from strata.kv.recall.magicpig import BITS, TABLES, MagicPIGPolicy

    per_token = MagicPIGPolicy.host_bytes_per_token(geometry.num_kv_heads, geometry.sparse_layers)
    logger.info(
        "magicpig: SimHash %d bits x %d tables; its tables take %s of host memory per token "
        "beside the store; %s", BITS, TABLES, format_bytes(per_token),
        host_attention_cost(device).describe(),
    )  # fmt: skip
