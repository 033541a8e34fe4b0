"""Build the configured KV tiers for an engine, and the scheduler's view of them."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from strata.config import TierConfig
from strata.kv.cache import KVCache
from strata.kv.manager import KVManager
from strata.kv.tiers.base import BlockLayout, TierStore
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.load_tracker import TierLoadTracker
from strata.kv.tiers.loads import NoTierLoads, S, TierLoads
from strata.kv.tiers.manager import TierManager

logger = logging.getLogger("strata.kv.tiers")

GIB = 1 << 30


def block_layout(kv_cache: KVCache, fingerprint: str, dtype: torch.dtype) -> BlockLayout:
    """The stored-block layout: blocks of another dtype or codec never match it."""
    return BlockLayout(
        fingerprint=fingerprint,
        num_layers=kv_cache.num_layers,
        num_kv_heads=kv_cache.shape.num_kv_heads,
        head_dim=kv_cache.shape.head_dim,
        block_size=kv_cache.block_size,
        dtype=str(dtype).removeprefix("torch."),
        codec=kv_cache.codec.layout_name,
    )


def build_tiers(
    config: TierConfig, kv_cache: KVCache, fingerprint: str, dtype: torch.dtype
) -> TierManager | None:
    if not config.enabled:
        return None
    layout = block_layout(kv_cache, fingerprint, dtype)
    pin = kv_cache.device.type == "cuda"
    if config.cpu_memory is None:
        logger.info("KV tiers stage through CPU memory: a %.1f GiB CPU tier is added",
                    config.STAGING_GIB)  # fmt: skip
    cpu = CPUTier(layout, int(config.cpu_gib * GIB), pin_memory=pin, eviction=config.eviction)
    lower: list[TierStore] = []
    if config.disk_dir is not None:
        from strata.kv.tiers.disk import DiskTier

        lower.append(
            DiskTier(layout, config.disk_dir, int(config.disk_size * GIB), eviction=config.eviction)
        )
    if config.remote is not None:
        from strata.kv.tiers.remote import RemoteTier

        lower.append(RemoteTier(layout, config.remote, timeout_s=config.remote_timeout_s))
    manager = TierManager(kv_cache, cpu, lower)
    logger.info(
        "KV tiers: %s; block %.2f MiB; written through on compute, promoted on hit; "
        "eviction %s; preemption %s",
        manager.describe(), layout.nbytes / (1 << 20), config.eviction, config.preemption_mode,
    )  # fmt: skip
    return manager


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
