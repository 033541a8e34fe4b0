"""Build expert offloading for an engine: size the arena from the budget, split it, and
swap the model's routed experts for OffloadedExperts.

    gpu_memory = dense weights + activation peak + arena
    arena      = KV blocks [0, limit) + expert slots above (boundary.py)

On CUDA the dense weights and the activation peak are measured by a warm-up step run
through a provisional cache of top_k slots; on the CPU (tests) they are estimated.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from strata.errors import KVCacheTooSmallError
from strata.kv.cache import KVCache
from strata.models.moe import MoeModel
from strata.moe.arena import ExpertArena
from strata.moe.boundary import ExpertOffload
from strata.moe.cost_model import measure_cost_model
from strata.moe.expert_cache import ExpertCache
from strata.moe.host_store import HostExpertStore
from strata.moe.offloaded_experts import OffloadedExperts, OffloadOptions
from strata.moe.policies import make_policy

if TYPE_CHECKING:
    from strata.engine.engine import LLMEngine

logger = logging.getLogger("strata.moe")

GIB = 1 << 30


def build_offload(engine: LLMEngine) -> ExpertOffload:
    cfg = engine.config.moe
    model = engine.loaded.model
    if not isinstance(model, MoeModel):
        raise TypeError("expert offloading needs a MoE model")
    mc = engine.model_config
    device, dtype = engine.device, engine.dtype
    block_size = engine.config.cache.block_size
    store = HostExpertStore(model.expert_weights, cfg.miss_precision)
    routers = {b.layer_index: b.router for b in model.moe_blocks()}
    max_slots = len(store.layers) * store.num_experts
    options, cost_model = _options(engine, store)

    if cfg.gpu_memory is not None:
        used = _non_arena_bytes(engine, store, routers)
        block_bytes = KVCache.bytes_per_block(mc, block_size, dtype)
        num_blocks = max(0, int(cfg.gpu_memory * GIB) - used) // block_bytes
        slots = cfg.expert_slots or int(
            cfg.expert_fraction * num_blocks * block_bytes // store.expert_bytes
        )
        source = f"gpu_memory={cfg.gpu_memory} GiB minus {used / GIB:.2f} GiB weights+activations"
    else:
        assert cfg.expert_slots is not None
        kv_blocks = engine._decide_num_blocks()
        slots = min(cfg.expert_slots, max_slots)
        num_blocks = ExpertArena.blocks_for(mc, block_size, kv_blocks, slots, store.expert_numel)
        source = f"{kv_blocks} KV blocks + {slots} expert slots"
    min_kv = -(-engine.max_model_len // block_size)
    arena = ExpertArena(mc, num_blocks, block_size, store.expert_numel, dtype, device)
    slots = min(slots, max_slots, arena.slots_above(min_kv))
    if slots < 1 or num_blocks < min_kv:
        raise KVCacheTooSmallError(
            f"the GPU budget ({source}) leaves {arena.nbytes / GIB:.2f} GiB: not enough for "
            f"one sequence of max_model_len={engine.max_model_len} ({min_kv} KV blocks) plus "
            f"one expert ({store.expert_bytes / GIB:.3f} GiB); raise --gpu-memory or lower "
            "--max-model-len"
        )
    cache = ExpertCache(store, arena.slot, 0, make_policy(cfg.policy, mc.num_layers), device)
    experts = OffloadedExperts(cache, routers, options, cost_model)
    model.set_routed_experts(experts)
    offload = ExpertOffload(arena, cache, experts, slots, max_slots, min_kv)
    logger.info(
        "MoE offload: %d MoE layers x %d experts of %.1f MiB in %s host memory (%.2f GiB); "
        "arena %.2f GiB (%s): KV %d blocks, %d expert slots (%.1f per layer, %.0f%% of "
        "experts); policy %s, prefetch %s, CPU compute %s, miss precision %s%s",
        len(store.layers), store.num_experts, store.expert_bytes / (1 << 20),
        "pinned" if model.expert_weights[0].gate_up.is_pinned() else "pageable",
        store.nbytes / GIB, arena.nbytes / GIB, source, arena.limit_for_slots(slots), slots,
        slots / len(store.layers), 100 * slots / max_slots, cfg.policy,
        "on" if options.prefetch else "off", options.cpu_compute, cfg.miss_precision,
        " (naive baseline)" if options.naive else "",
    )  # fmt: skip
    if cost_model is not None:
        logger.info("MoE cost model: %s", cost_model.describe())
    return offload


def _options(engine: LLMEngine, store: HostExpertStore) -> tuple[OffloadOptions, object]:
    cfg = engine.config.moe
    cpu_mode = "off" if cfg.naive else cfg.cpu_compute
    cost_model = None
    if cpu_mode == "auto":
        if engine.device.type == "cuda":
            cost_model = measure_cost_model(store, engine.device)
        else:
            cpu_mode = "off"
            logger.info("MoE CPU compute off: the model already runs on the CPU")
    threshold = cfg.low_precision_threshold if cfg.miss_precision != "full" else 0.0
    options = OffloadOptions(
        prefetch=cfg.prefetch and not cfg.naive,
        cpu_compute=cpu_mode,
        low_precision_threshold=threshold,
        naive=cfg.naive,
    )
    return options, cost_model


def _non_arena_bytes(engine: LLMEngine, store: HostExpertStore, routers: dict) -> int:
    """Dense weights plus the activation peak of the largest step."""
    model = engine.loaded.model
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    if engine.device.type != "cuda":
        mc, sched = engine.model_config, engine.config.scheduler
        tokens = min(sched.max_num_batched_tokens, engine.max_model_len)
        k = mc.num_experts_per_tok
        per_token = mc.hidden_size * (8 + 3 * k) + 2 * mc.moe_intermediate_size * k
        elt = torch.empty((), dtype=engine.dtype).element_size()
        logits = min(sched.max_num_seqs, tokens) * mc.vocab_size * 4 * 2
        return dense + tokens * per_token * elt + logits
    from strata.engine.warmup import warmup_peak_bytes

    mc = engine.model_config
    k = mc.num_experts_per_tok
    blocks = ExpertArena.blocks_for(mc, engine.config.cache.block_size, 0, k, store.expert_numel)
    arena = ExpertArena(
        mc, blocks, engine.config.cache.block_size, store.expert_numel, engine.dtype, engine.device
    )
    cache = ExpertCache(store, arena.slot, k, make_policy("lru", mc.num_layers), engine.device)
    model.set_routed_experts(OffloadedExperts(cache, routers, OffloadOptions(cpu_compute="off")))
    peak = warmup_peak_bytes(engine)  # every byte torch holds at the peak, weights included
    provisional = arena.nbytes
    del cache, arena
    torch.cuda.empty_cache()
    return peak - provisional
