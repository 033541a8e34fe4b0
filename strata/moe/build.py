"""Build expert offloading for an engine: size the arena from the budget, split it, and
swap the model's routed experts for OffloadedExperts.

    gpu_memory = dense weights + activation peak + arena
    arena      = KV blocks [0, limit) + expert slots above (boundary.py)

On CUDA the dense weights and the activation peak are measured by a warm-up step run
through a provisional cache of top_k slots; on the CPU (tests) they are estimated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from strata.config import MoEConfig
from strata.errors import KVCacheTooSmallError
from strata.kv.cache import KVCache
from strata.models.moe import MoeModel
from strata.models.placement import ModelPlacement
from strata.moe.arena import ExpertArena
from strata.moe.boundary import ExpertOffload
from strata.moe.cost_model import OffloadCostModel, measure_cost_model
from strata.moe.expert_cache import ExpertCache
from strata.moe.host_store import HostExpertStore
from strata.moe.offloaded_experts import ExpertRouter, OffloadedExperts, OffloadOptions
from strata.moe.policies import make_policy

logger = logging.getLogger("strata.moe")

GIB = 1 << 30


def build_offload(
    cfg: MoEConfig,
    placed: ModelPlacement,
    kv_blocks: Callable[[], int],
    measure_peak: Callable[[], int],
) -> ExpertOffload:
    """Offloading for `placed.model`. kv_blocks() sizes the KV pool when the budget is
    given in expert slots; measure_peak() runs a warm-up step (CUDA) when it is given in
    GiB of GPU memory."""
    model = placed.model
    if not isinstance(model, MoeModel):
        raise TypeError("expert offloading needs a MoE model")
    mc, device, dtype = placed.model_config, placed.device, placed.dtype
    block_size = placed.block_size
    store = HostExpertStore(model.expert_weights, cfg.miss_precision)
    routers = {b.layer_index: b.router for b in model.moe_blocks()}
    max_slots = len(store.layers) * store.num_experts
    options, cost_model = _options(cfg, device, store)

    num_blocks, slots, source = _split_budget(cfg, placed, store, kv_blocks, routers, measure_peak)
    min_kv = -(-placed.max_model_len // block_size)
    arena = ExpertArena(mc, num_blocks, block_size, store.expert_numel, dtype, device)
    slots = min(slots, max_slots, arena.slots_above(min_kv))
    if slots < 1 or num_blocks < min_kv:
        raise KVCacheTooSmallError(
            f"the GPU budget ({source}) leaves {arena.nbytes / GIB:.2f} GiB: not enough for "
            f"one sequence of max_model_len={placed.max_model_len} ({min_kv} KV blocks) plus "
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


def _split_budget(
    cfg: MoEConfig,
    placed: ModelPlacement,
    store: HostExpertStore,
    kv_blocks: Callable[[], int],
    routers: Mapping[int, ExpertRouter],
    measure_peak: Callable[[], int],
) -> tuple[int, int, str]:
    """(arena blocks, expert slots wanted, which budget decided) for the configuration."""
    mc, block_size = placed.model_config, placed.block_size
    if cfg.gpu_memory is not None:
        used = _non_arena_bytes(placed, store, routers, measure_peak)
        block_bytes = KVCache.bytes_per_block(mc, block_size, placed.dtype)
        num_blocks = max(0, int(cfg.gpu_memory * GIB) - used) // block_bytes
        slots = cfg.expert_slots or int(
            cfg.expert_fraction * num_blocks * block_bytes // store.expert_bytes
        )
        return num_blocks, slots, (
            f"gpu_memory={cfg.gpu_memory} GiB minus {used / GIB:.2f} GiB weights+activations"
        )
    assert cfg.expert_slots is not None
    pool_blocks = kv_blocks()
    slots = min(cfg.expert_slots, len(store.layers) * store.num_experts)
    num_blocks = ExpertArena.blocks_for(mc, block_size, pool_blocks, slots, store.expert_numel)
    return num_blocks, slots, f"{pool_blocks} KV blocks + {slots} expert slots"


def _options(
    cfg: MoEConfig, device: torch.device, store: HostExpertStore
) -> tuple[OffloadOptions, OffloadCostModel | None]:
    cpu_mode = "off" if cfg.naive else cfg.cpu_compute
    cost_model = None
    if cpu_mode == "auto":
        if device.type == "cuda":
            cost_model = measure_cost_model(store, device)
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


def _non_arena_bytes(
    placed: ModelPlacement,
    store: HostExpertStore,
    routers: Mapping[int, ExpertRouter],
    measure_peak: Callable[[], int],
) -> int:
    """Dense weights plus the activation peak of the largest step."""
    model = placed.model
    assert isinstance(model, MoeModel)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    mc, block_size, device = placed.model_config, placed.block_size, placed.device
    if device.type != "cuda":
        sched = placed.scheduler
        tokens = min(sched.max_num_batched_tokens, placed.max_model_len)
        k = mc.num_experts_per_tok
        per_token = mc.hidden_size * (8 + 3 * k) + 2 * mc.moe_intermediate_size * k
        elt = placed.dtype.itemsize
        logits = min(sched.max_num_seqs, tokens) * mc.vocab_size * 4 * 2
        return dense + tokens * per_token * elt + logits
    k = mc.num_experts_per_tok
    blocks = ExpertArena.blocks_for(mc, block_size, 0, k, store.expert_numel)
    arena = ExpertArena(mc, blocks, block_size, store.expert_numel, placed.dtype, device)
    cache = ExpertCache(store, arena.slot, k, make_policy("lru", mc.num_layers), device)
    model.set_routed_experts(OffloadedExperts(cache, routers, OffloadOptions(cpu_compute="off")))
    peak = measure_peak()  # every byte torch holds at the peak, weights included
    provisional = arena.nbytes
    del cache, arena
    torch.cuda.empty_cache()
    return peak - provisional
