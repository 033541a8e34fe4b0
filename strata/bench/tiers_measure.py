"""Measuring primitives of `strata bench tiers`: one request's TTFT, tier stat deltas,
pinned host-to-device bandwidth, and the OS page cache of the disk tier's files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams

TIERS = ("cpu", "disk", "remote")


@dataclass(frozen=True)
class Answer:
    ttft_s: float
    token_ids: list[int]
    cached_tokens: int  # prompt tokens not computed: GPU prefix hit + tier load


def ask(llm: LLM, prompt: list[int], max_tokens: int) -> Answer:
    """Run one request alone; TTFT is from queueing it to the step that sampled its first
    token (each step ends with a host sync, so the clock reads finished GPU work)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    request_id = engine.add_request(prompt, params)
    first: float | None = None
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if out.error is not None:
                raise RuntimeError(f"request failed: {out.error}")
            if first is None and out.token_ids:
                first = time.perf_counter()
            if out.finished:
                assert first is not None
                return Answer(first - start, list(out.token_ids), out.num_cached_tokens)


def tier_counters(llm: LLM) -> dict[str, float]:
    """The counters whose deltas describe one load: per-tier bytes and seconds read, and
    tokens loaded from tiers."""
    stats = llm.stats()
    out: dict[str, float] = {"tier_hit_tokens": stats.get("prefix_cache_tier_hit_tokens", 0)}
    for tier in TIERS:
        for name in ("bytes_read", "read_seconds", "hits", "errors", "corrupt"):
            out[f"{tier}_{name}"] = stats.get(f"kv_tier_{tier}_{name}", 0)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after}


def flush(llm: LLM) -> None:
    """Wait for every write-through (cpu, disk, remote) queued so far."""
    if llm.engine.tiers is not None:
        llm.engine.tiers.flush()


def cold_gpu(llm: LLM) -> None:
    """Writes finished, then every cached block out of the GPU pool (they stay in tiers)."""
    flush(llm)
    llm.engine.kv.evict_all_cached()


def pinned_h2d_bytes_per_s(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best of `repeats` copies of a pinned `nbytes` host tensor to the device (CUDA events)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.random_(0, 256)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / 1e3)
    del src, dst
    return nbytes / best


def block_files(directory: str) -> list[Path]:
    return [p for p in Path(directory).rglob("*") if p.is_file() and not p.name.endswith(".tmp")]


def warm_page_cache(directory: str) -> int:
    """Read every block file once so that later reads come from the OS page cache; bytes read."""
    total = 0
    for path in block_files(directory):
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total


def drop_page_cache(directory: str) -> bool:
    """Write dirty pages back, then ask the kernel to drop the block files' cached pages
    (POSIX_FADV_DONTNEED). False where the platform has no posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for path in block_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def sync(llm: LLM) -> None:
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize(llm.engine.device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def summary_stats(llm: LLM) -> dict[str, Any]:
    """The tier counters worth keeping in the report of one engine's run."""
    stats = llm.stats()
    keep = (
        "kv_tier_blocks",
        "kv_tier_partial",
        "prefix_cache",
        "num_swaps",
        "num_preemptions",
        "kv_session",
    )
    return {
        k: v
        for k, v in stats.items()
        if k.startswith(keep)
        or "errors" in k
        or "corrupt" in k
        or k.endswith(("_hits", "_misses", "_bytes_per_s"))
    }
