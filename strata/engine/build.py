"""Build an engine's collaborators from its configuration, in dependency order:

    model -> attention backend -> KV pool (or the MoE arena that holds it) -> tiers
          -> KV manager -> sessions, tier loads, scheduler -> runner -> KV policies
          -> CUDA graphs

Every decision is logged: the model, the backend, the pool size and codec, the tiers,
the policy defaults. The engine itself only holds the parts (`EngineParts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from strata.attention.backend import AttentionBackend, choose_backend, get_backend
from strata.config import CacheConfig, EngineConfig
from strata.engine.runner import ModelRunner
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence
from strata.engine.shadow_pass import ShadowPass
from strata.engine.tp.parallel import TensorParallel, start_tensor_parallel
from strata.engine.warmup import warmup_peak_bytes
from strata.errors import KVCacheTooSmallError
from strata.kv.cache import KVCache
from strata.kv.codec import BlockCodec, get_codec
from strata.kv.coded_attention import attention_over
from strata.kv.manager import KVManager
from strata.kv.policies.base import AttentionShape
from strata.kv.policies.model_access import ModelAccess
from strata.kv.policies.runtime.driver import KVPolicyDriver, PolicyDefaults
from strata.kv.policies.runtime.rank_compaction import RankShard
from strata.kv.policies.runtime.reconstruction import (
    PASS_HEADROOM,
    ContextReconstruction,
    PassLimits,
)
from strata.kv.pool_order import attention_slope, make_free_order
from strata.kv.prefix import root_key
from strata.kv.recall.build import build_recall, recall_enabled, recall_gpu_share, recall_slots
from strata.kv.recall.manager import RecallManager
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.registry import is_recall_policy
from strata.kv.recall.step_graphs import RecallStepGraphs
from strata.kv.sessions import SessionPins
from strata.kv.sizing import (
    GIB,
    blocks_for_tokens,
    format_bytes,
    needs_gpu_measurement,
    size_kv_pool,
)
from strata.kv.swap_cost import SwapCostModel
from strata.kv.tiers.build import build_tier_loads, build_tiers
from strata.kv.tiers.loads import TierLoads
from strata.kv.tiers.manager import TierManager
from strata.kv.tiers.slot_codec import tier_codec
from strata.models.loader import LoadedModel, load_model
from strata.models.placement import ModelPlacement
from strata.models.rope import inverse_frequencies
from strata.moe.boundary import ExpertOffload
from strata.moe.build import build_offload
from strata.moe.rebalancer import Rebalancer

logger = logging.getLogger("strata.engine")


@dataclass(frozen=True)
class EngineParts:
    loaded: LoadedModel
    placed: ModelPlacement  # the model, device, dtype and limits
    backend: AttentionBackend[Any]  # as named; the runner's may wrap it (lossy codec)
    codec: BlockCodec
    kv_cache: KVCache
    kv: KVManager
    tiers: TierManager | None
    sessions: SessionPins
    swap_cost: SwapCostModel
    scheduler: Scheduler
    runner: ModelRunner
    kv_policies: KVPolicyDriver
    moe: ExpertOffload | None
    rebalancer: Rebalancer | None
    recall: RecallManager | None
    parallel: TensorParallel | None = None  # the other ranks, under tensor parallelism


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved


def build_engine_parts(config: EngineConfig) -> EngineParts:
    loaded, placed, parallel = load_placed_model(config)
    try:
        return _build_parts(config, loaded, placed, parallel)
    except BaseException:
        if parallel is not None:
            parallel.close()
        raise


def _kv_manager(
    cache: CacheConfig, placed: ModelPlacement, num_blocks: int, root: bytes,
    tiers: TierManager | None,
) -> KVManager:  # fmt: skip
    slope = attention_slope(placed.model_config, placed.block_size)
    return KVManager(
        num_blocks, placed.block_size, root, cache.enable_prefix_caching, tiers=tiers,
        reuse_holes=cache.reuse_holes, eviction=make_free_order(cache.eviction, slope),
    )  # fmt: skip


def _build_parts(
    config: EngineConfig, loaded: LoadedModel, placed: ModelPlacement,
    parallel: TensorParallel | None,
) -> EngineParts:  # fmt: skip
    backend_name, why = choose_backend(config.attention_backend, placed.device)
    backend = get_backend(backend_name)
    logger.info("attention backend %s (%s)", backend_name, why)
    codec = get_codec(config.cache.kv_cache_dtype)
    moe, kv_cache, recall_bytes = build_kv_cache(config, placed, backend, codec)
    peers = None if parallel is None else parallel.peers()
    tiers = build_tiers(
        config.cache.tiers, kv_cache, loaded.fingerprint, placed.dtype,
        None if parallel is None else parallel.rank_layout, peers,
        attention_slope(placed.model_config, placed.block_size),
    )  # fmt: skip
    layout = kv_layout(placed, codec, parallel, config.cache.tiers.codec)
    root = root_key(loaded.fingerprint, layout)
    kv = _kv_manager(config.cache, placed, kv_cache.num_blocks, root, tiers)
    sessions = SessionPins(kv, tiers, config.cache.tiers.session_gpu_fraction)
    tier_block = kv_cache.block_bytes if tiers is None else tiers.cpu.layout.nbytes
    swap_cost = SwapCostModel(tier_block, placed.block_size, placed.device)
    tier_loads: TierLoads[Sequence] = build_tier_loads(
        tiers, kv, config.cache.tiers.preemption_mode, swap_cost.swap_is_cheaper
    )
    recall = None
    if recall_enabled(config.cache):
        whole = placed.model_config if parallel is None else parallel.layout.full
        recall = build_recall(
            config.cache, placed.model_config, placed.dtype, placed.device, recall_bytes,
            placed.model.rope, graphs=not config.enforce_eager,
            num_slots=recall_slots(config.cache, whole, placed.dtype, parallel is not None),
            shard=None if parallel is None else HeadShard(parallel.comm, whole.num_kv_heads),
            prefix_root=root,
        )  # fmt: skip
    scheduler = Scheduler(config.scheduler, kv, tier_loads, reclaim=sessions.reclaim, recall=recall)
    rebalancer = None
    if moe is not None:
        moe.attach(kv)
        rebalancer = Rebalancer(
            moe, config.moe.rebalance_interval,
            min_kv_blocks=blocks_for_tokens(placed.max_model_len, placed.block_size),
            block_size=placed.block_size,
        )  # fmt: skip
    attention = attention_over(kv_cache, backend)  # wraps it for a lossy codec
    runner = ModelRunner(loaded.model, kv_cache, attention, placed.device)
    if parallel is not None:
        parallel.set_pool(kv_cache.num_blocks, recall)
        runner.parallel = parallel
    shard = None if parallel is None else RankShard(parallel.kv_head_slices[0], peers)
    kv_policies = build_kv_policies(config, loaded, placed, kv, kv_cache, runner, recall, shard)
    if kv_cache.tails is not None:  # the tails reclaim rows of blocks no running seq writes
        kv_cache.tails.live_blocks = lambda: open_blocks(scheduler, kv)
    if parallel is None:
        capture_graphs(config, placed, runner)
        if recall is not None:
            _recall_step_graphs(config, placed, runner, recall)
    return EngineParts(
        loaded, placed, backend, codec, kv_cache, kv, tiers, sessions, swap_cost, scheduler,
        runner, kv_policies, moe, rebalancer, recall, parallel,
    )  # fmt: skip


def load_placed_model(
    config: EngineConfig,
) -> tuple[LoadedModel, ModelPlacement, TensorParallel | None]:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    requested_len = config.scheduler.max_model_len
    # With expert offloading, routed experts are built in (pinned) CPU memory.
    expert_device = torch.device("cpu") if config.moe.enabled else None
    # RoPE tables also cover the reconstruction passes KVzip runs after a context.
    rope_len = None if requested_len is None else requested_len + PASS_HEADROOM
    parallel = None
    if config.parallel.tensor_parallel_size > 1:
        if needs_gpu_measurement(config.cache, device.type == "cuda"):
            raise ValueError(
                "tensor_parallel_size > 1 on CUDA needs kv_cache_memory or num_kv_blocks: "
                "the KV pool is not measured across ranks yet"
            )
        parallel = start_tensor_parallel(config, device, dtype, rope_len)
    try:
        comm = None if parallel is None else parallel.comm
        loaded = load_model(config.model, device, dtype, rope_len, config.seed, expert_device, comm)
        if parallel is not None:
            parallel.loaded()
    except BaseException:
        if parallel is not None:
            parallel.close()
        raise
    mc = loaded.config
    limit = mc.context_limit
    if limit < mc.max_position_embeddings:
        logger.info(
            "context capped at the sliding window, %d tokens (sliding-window attention "
            "is not implemented; within the window it equals full attention)",
            limit,
        )
    num_params = sum(p.numel() for p in loaded.model.parameters())
    logger.info(
        "model %s: %s, %d layers, %.1fM parameters, %s on %s",
        loaded.name, mc.model_type, mc.num_layers, num_params / 1e6,
        str(dtype).removeprefix("torch."), device,
    )  # fmt: skip
    placed = ModelPlacement(
        loaded.model, mc, config.scheduler, config.cache.block_size,
        min(requested_len or limit, limit), dtype, device,
    )  # fmt: skip
    return loaded, placed, parallel


def kv_layout(
    placed: ModelPlacement,
    codec: BlockCodec,
    parallel: TensorParallel | None = None,
    tier_codec_name: str = "none",
) -> str:
    """The KV layout in every block key: `auto` keeps the string (and so the keys of stored
    blocks) it always had; a lossy codec adds its layout, a tier codec its own (a prefix
    loaded through it is not the exact one), tensor parallelism its rank layout (a rank's
    blocks hold its own KV heads only)."""
    layout = f"{str(placed.dtype).removeprefix('torch.')}/bs{placed.block_size}"
    if not codec.lossless:
        layout = f"{layout}/{codec.layout_name}"
    tier = tier_codec(tier_codec_name)
    if tier is not None:
        layout = f"{layout}/tier-{tier.layout_name}"
    if parallel is not None:
        layout = f"{layout}/{parallel.rank_layout}"
    return layout


def build_kv_cache(
    config: EngineConfig, placed: ModelPlacement, backend: AttentionBackend[Any], codec: BlockCodec
) -> tuple[ExpertOffload | None, KVCache, int]:
    """The KV pool: its own, or the bottom of the arena it shares with the expert slots;
    and the GPU bytes of the KV budget left to recall sequences (recall/build.py)."""
    if config.moe.enabled and placed.model_config.is_moe:
        if recall_enabled(config.cache):
            raise ValueError("recall policies do not run with MoE expert offloading yet")
        if not codec.lossless:
            raise ValueError(
                f"MoE expert offloading shares one arena with a raw KV pool: use "
                f"kv_cache_dtype='auto', not {config.cache.kv_cache_dtype!r}"
            )
        moe = build_offload(
            config.moe, placed,
            kv_blocks=lambda: decide_num_blocks(config, placed, backend, codec, 0),
            measure_peak=lambda: warmup_peak_bytes(placed, backend),
        )  # fmt: skip
        return moe, moe.arena.kv_cache, 0
    # One full-precision tail row per running sequence holds its open block (codec_tail.py).
    tail_rows = 0 if codec.lossless else config.scheduler.max_num_seqs
    num_blocks = decide_num_blocks(config, placed, backend, codec, tail_rows)
    recall_bytes = 0
    if recall_enabled(config.cache):
        num_blocks, recall_bytes = split_for_recall(config.cache, placed, codec, num_blocks)
    kv_cache = KVCache(
        placed.model_config, num_blocks, placed.block_size, placed.dtype, placed.device, codec,
        tail_rows,
    )  # fmt: skip
    return None, kv_cache, recall_bytes


def split_for_recall(
    cache: CacheConfig, placed: ModelPlacement, codec: BlockCodec, num_blocks: int
) -> tuple[int, int]:
    """(pool blocks, recall GPU bytes): recall sequences' share comes out of the KV budget;
    an exact num_kv_blocks keeps the pool as given, the recall bytes come on top."""
    mc = placed.model_config
    block_bytes = KVCache.bytes_per_block(mc, cache.block_size, placed.dtype, codec)
    if cache.recall.gpu_memory is not None:
        recall_bytes = int(cache.recall.gpu_memory * GIB)
    else:
        recall_bytes = int(num_blocks * block_bytes * recall_gpu_share(cache))
    if cache.num_blocks is not None:
        return num_blocks, recall_bytes
    left = num_blocks - -(-recall_bytes // block_bytes)
    if left < 1:
        raise KVCacheTooSmallError(
            f"kv_recall_gpu_memory ({format_bytes(recall_bytes)}) leaves no block of the KV "
            f"budget ({format_bytes(num_blocks * block_bytes)}) to the pool"
        )
    return left, recall_bytes


def decide_num_blocks(
    config: EngineConfig,
    placed: ModelPlacement,
    backend: AttentionBackend[Any],
    codec: BlockCodec,
    tail_rows: int,
) -> int:
    """Blocks that fit the KV memory budget (kv/sizing.py), measured on CUDA; logged."""
    cache, mc = config.cache, placed.model_config
    block_bytes = KVCache.bytes_per_block(mc, cache.block_size, placed.dtype, codec)
    raw_block = KVCache.bytes_per_block(mc, cache.block_size, placed.dtype)
    gpu_budget = None
    if needs_gpu_measurement(cache, placed.device.type == "cuda"):
        gpu_budget = free_gpu_bytes(placed, backend, cache.gpu_memory_utilization)
    # Under a recall default policy the pool need not hold a max_model_len sequence.
    longest = placed.block_size if is_recall_policy(cache.kv_policy) else placed.max_model_len
    size = size_kv_pool(cache, block_bytes, longest, tail_rows * raw_block, gpu_budget)
    if not codec.lossless:
        logger.info(
            "KV codec %s: %d bytes a block (%s: %d), %.2fx the blocks per GiB; %d "
            "full-precision tail rows for open blocks, %s; attention reads coded blocks "
            "decoded into a per-layer scratch (%s backend, no fused dequant kernel)",
            codec.name, block_bytes, str(placed.dtype).removeprefix("torch."), raw_block,
            raw_block / block_bytes, tail_rows, format_bytes(tail_rows * raw_block), backend.name,
        )  # fmt: skip
    sched = config.scheduler
    logger.info(
        "KV pool: %s (%s, kv_cache_dtype %s); max_model_len %d, max_num_batched_tokens %d, "
        "max_num_seqs %d, prefix caching %s",
        size.describe(cache.block_size), size.source, codec.name, placed.max_model_len,
        sched.max_num_batched_tokens, sched.max_num_seqs,
        "on" if cache.enable_prefix_caching else "off",
    )  # fmt: skip
    return size.num_blocks


def free_gpu_bytes(
    placed: ModelPlacement, backend: AttentionBackend[Any], utilization: float
) -> int:
    """Bytes left for KV after a warm-up step of the largest batch the scheduler allows."""
    peak = warmup_peak_bytes(placed, backend)
    free, total = torch.cuda.mem_get_info(placed.device)
    others = total - free - torch.cuda.memory_reserved(placed.device)
    return int(total * utilization) - peak - others


def build_kv_policies(
    config: EngineConfig,
    loaded: LoadedModel,
    placed: ModelPlacement,
    kv: KVManager,
    kv_cache: KVCache,
    runner: ModelRunner,
    recall: RecallManager | None,
    shard: RankShard | None = None,
) -> KVPolicyDriver:
    """shard: under tensor parallelism, rank 0's KV heads and the workers; policies then
    see the whole model's heads."""
    mc, cache = placed.model_config, config.cache
    inv_freq, scaling = inverse_frequencies(mc.hf_config, mc.head_dim)
    whole = mc if runner.parallel is None else runner.parallel.layout.full
    driver = KVPolicyDriver(
        kv, kv_cache,
        AttentionShape(whole.num_layers, whole.num_heads, whole.num_kv_heads, whole.head_dim),
        PolicyDefaults(cache.kv_policy, cache.kv_budget, cache.evict_interval),
        model=ModelAccess(inv_freq.to(placed.device), scaling, loaded.tokenizer),
        reconstruction=ContextReconstruction(
            ShadowPass(runner), kv,
            PassLimits(config.scheduler.max_num_batched_tokens,
                       max_positions=loaded.model.rope.cos.shape[0]),
        ),
        recall=recall, shard=shard,
    )  # fmt: skip
    logger.info(
        "KV policy: default %s%s; requests may name their own; policies that evict "
        "while decoding evict every %d steps",
        cache.kv_policy,
        "" if cache.kv_budget is None else f" (budget {cache.kv_budget:g})",
        cache.evict_interval,
    )
    return driver


def open_blocks(scheduler: Scheduler, kv: KVManager) -> set[int]:
    """Blocks that running sequences have partly computed: the tail rows still needed."""
    bs = kv.block_size
    return {
        kv.block_table(s.request_id)[s.num_kv_slots // bs]
        for s in scheduler.running
        if s.num_kv_slots % bs and kv.has(s.request_id)
    }


def _recall_step_graphs(
    config: EngineConfig, placed: ModelPlacement, runner: ModelRunner, recall: RecallManager
) -> None:
    """Whole decode steps of recall sequences in CUDA graphs (kv/recall/step_graphs.py), on
    CUDA unless eager, for a model whose forward never reads the device on the host."""
    if config.enforce_eager or placed.device.type != "cuda":
        return
    if not getattr(placed.model, "supports_cuda_graphs", True):
        return
    rows = min(config.cuda_graph_max_batch, config.scheduler.max_num_seqs)
    runner.recall_graphs = RecallStepGraphs(
        placed.model, runner.kv, runner.recall_attention, placed.device, rows
    )
    recall.release_listeners.append(runner.recall_graphs.forget)
    logger.info("recall: decode steps of up to %d recall rows, all selecting, replay one "
                "CUDA graph each once their rows repeat", rows)  # fmt: skip


def capture_graphs(config: EngineConfig, placed: ModelPlacement, runner: ModelRunner) -> None:
    """Capture decode CUDA graphs once the KV pool exists (graph-safe backend on CUDA)."""
    if config.enforce_eager or placed.device.type != "cuda":
        return
    if not getattr(placed.model, "supports_cuda_graphs", True):
        logger.info("CUDA graphs off: the model reads expert routing on the host")
        return
    if not runner.backend.graph_safe:
        logger.info("CUDA graphs off: the %s attention backend is not graph-safe",
                    runner.backend.name)  # fmt: skip
        return
    max_batch = min(config.cuda_graph_max_batch, config.scheduler.max_num_seqs)
    runner.capture_graphs(max_batch, placed.max_model_len)
