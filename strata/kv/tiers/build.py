"""Build the configured KV tiers for an engine, and the scheduler's view of them."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch

from strata.config import TierConfig
from strata.kv.cache import KVCache
from strata.kv.codec import BlockCodec
from strata.kv.manager import KVManager
from strata.kv.tiers.base import BlockLayout, TierStore
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.load_tracker import TierLoadTracker
from strata.kv.tiers.loads import NoTierLoads, S, TierLoads
from strata.kv.tiers.manager import TierManager
from strata.kv.tiers.sharded import ShardedTierManager
from strata.kv.tiers.slot_codec import tier_codec
from strata.kv.tiers.store_secret import SECRET_ENV, resolve_secret
from strata.kv.tiers.tier_ops import TierPeers

logger = logging.getLogger("strata.kv.tiers")

GIB = 1 << 30


def block_layout(
    kv_cache: KVCache, fingerprint: str, dtype: torch.dtype, codec: BlockCodec | None = None
) -> BlockLayout:
    """The stored-block layout: blocks of another dtype or codec never match it. `codec`:
    a tier codec (kv_tier_codec), else blocks keep the pool's codec."""
    return BlockLayout(
        fingerprint=fingerprint,
        num_layers=kv_cache.num_layers,
        num_kv_heads=kv_cache.shape.num_kv_heads,
        head_dim=kv_cache.shape.head_dim,
        block_size=kv_cache.block_size,
        dtype=str(dtype).removeprefix("torch."),
        codec=(codec or kv_cache.codec).layout_name,
    )


def build_tiers(
    config: TierConfig,
    kv_cache: KVCache,
    fingerprint: str,
    dtype: torch.dtype,
    rank_layout: str | None = None,
    peers: TierPeers | None = None,
    slope: float = 0.0,
) -> TierManager | None:
    """rank_layout (tensor parallelism: "tpNrR") keeps each rank's stored blocks apart, on
    disk in a directory of its own; `peers` (rank 0 only) are the other ranks' tiers.
    slope: the cost eviction order's recompute cost slope (pool_order.attention_slope)."""
    if not config.enabled:
        return None
    if rank_layout is not None:  # a hex digest, like every fingerprint (block_format)
        fingerprint = hashlib.sha256(f"{fingerprint}/{rank_layout}".encode()).hexdigest()
    layout = block_layout(kv_cache, fingerprint, dtype, tier_codec(config.codec))
    pin = kv_cache.device.type == "cuda"
    if config.cpu_memory is None:
        logger.info("KV tiers stage through CPU memory: a %.1f GiB CPU tier is added",
                    config.STAGING_GIB)  # fmt: skip
    cpu = CPUTier(layout, int(config.cpu_gib * GIB), pin, config.eviction, slope)
    lower = _lower_tiers(config, layout, slope)
    manager = (
        TierManager(kv_cache, cpu, lower) if peers is None
        else ShardedTierManager(kv_cache, cpu, lower, peers)
    )  # fmt: skip
    logger.info(
        "KV tiers: %s; block %.2f MiB (codec %s); written through on compute, promoted on "
        "hit; eviction %s; preemption %s",
        manager.describe(), layout.nbytes / (1 << 20), layout.codec, config.eviction,
        config.preemption_mode,
    )  # fmt: skip
    return manager


def _lower_tiers(config: TierConfig, layout: BlockLayout, slope: float) -> list[TierStore]:
    """The disk and remote tiers, authenticated when a store secret is configured."""
    secret = resolve_secret(config.store_secret, config.store_secret_file, config.store_encrypt)
    lower: list[TierStore] = []
    if config.disk_dir is not None:
        from strata.kv.tiers.disk import DiskTier

        size = int(config.disk_size * GIB)
        lower.append(DiskTier(layout, config.disk_dir, size, config.eviction, secret=secret,
                              read_threads=config.io_threads,
                              direct_io=config.disk_direct_io, slope=slope))  # fmt: skip
    if config.remote is not None:
        from strata.kv.tiers.remote import RemoteTier

        remote = RemoteTier(layout, config.remote, timeout_s=config.remote_timeout_s,
                            secret=secret, read_threads=config.io_threads)  # fmt: skip
        lower.append(remote)
        if secret is None:
            logger.warning(
                "the remote KV tier %s is shared and its blocks are not authenticated: anyone "
                "who can write to it can change this engine's outputs; set "
                "--kv-store-secret-file or $%s", remote.url, SECRET_ENV,
            )  # fmt: skip
    if secret is not None and lower:
        how = "encrypted and authenticated" if secret.encrypt else "authenticated"
        logger.info("KV store blocks are %s (namespace %s)", how, secret.namespace)
    return lower


def build_tier_loads(
    tiers: TierManager | None,
    kv: KVManager,
    preemption_mode: str,
    swap_is_cheaper: Callable[[int], bool] | None = None,
) -> TierLoads[S]:
    """The scheduler's tier bookkeeping: a no-op without tiers."""
    if tiers is None:
        return NoTierLoads()
    return TierLoadTracker(tiers, kv, preemption_mode, swap_is_cheaper)
