"""How many KV blocks the pool gets: a pure function of the configuration and the bytes
a block takes, shared by the engine's builder and the MoE budget split.

    budget (first that is set)          blocks
    cache.num_blocks                    as given
    cache.kv_cache_memory GiB           (GiB - tail bytes) // block bytes
    gpu_budget_bytes (CUDA, measured)   (budget - tail bytes) // block bytes
    CPU default                         (DEFAULT_CPU_KV_GIB - tail bytes) // block bytes

A lossy codec's tail rows (one full-precision block per running sequence, for its open
block) come out of the same budget. The pool must hold one sequence of max_model_len.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import CacheConfig
from strata.errors import KVCacheTooSmallError

GIB = 1 << 30


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.2f} MiB"


def blocks_for_tokens(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(frozen=True)
class KVPoolSize:
    num_blocks: int
    block_bytes: int
    source: str  # which budget decided, for the log and for errors

    def describe(self, block_size: int) -> str:
        tokens = self.num_blocks * block_size
        size = format_bytes(self.num_blocks * self.block_bytes)
        return f"{self.num_blocks} blocks x {block_size} tokens = {tokens} tokens, {size}"


def needs_gpu_measurement(cache: CacheConfig, on_cuda: bool) -> bool:
    """Whether size_kv_pool needs `gpu_budget_bytes` (a warm-up step measures it)."""
    return on_cuda and cache.num_blocks is None and cache.kv_cache_memory is None


def size_kv_pool(
    cache: CacheConfig,
    block_bytes: int,
    max_model_len: int,
    tail_bytes: int = 0,
    gpu_budget_bytes: int | None = None,
) -> KVPoolSize:
    """The pool for this budget; KVCacheTooSmallError if one max_model_len sequence does
    not fit. `gpu_budget_bytes` is required exactly when needs_gpu_measurement()."""
    if cache.num_blocks is not None:
        num_blocks, source = cache.num_blocks, "num_blocks"
    elif cache.kv_cache_memory is not None:
        num_blocks = max(0, int(cache.kv_cache_memory * GIB) - tail_bytes) // block_bytes
        source = f"kv_cache_memory={cache.kv_cache_memory} GiB"
    elif gpu_budget_bytes is not None:
        num_blocks = max(0, gpu_budget_bytes - tail_bytes) // block_bytes
        source = f"{cache.gpu_memory_utilization:.0%} of GPU memory minus the warm-up peak"
    else:
        num_blocks = max(0, int(cache.DEFAULT_CPU_KV_GIB * GIB) - tail_bytes) // block_bytes
        source = f"CPU default {cache.DEFAULT_CPU_KV_GIB} GiB"
    size = KVPoolSize(num_blocks, block_bytes, source)
    needed = blocks_for_tokens(max_model_len, cache.block_size)
    if num_blocks < needed:
        raise KVCacheTooSmallError(
            f"the KV pool ({source}) holds {size.describe(cache.block_size)}, but one "
            f"sequence of max_model_len={max_model_len} needs {needed} blocks "
            f"({format_bytes(needed * block_bytes)}); raise kv_cache_memory or lower "
            "max_model_len"
        )
    return size
