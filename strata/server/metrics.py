"""Prometheus metrics of one server, on a registry of its own.

Engine state (queues, KV blocks, prefix cache, token counters) is read from the engine
thread's latest stats snapshot when scraped; request latencies are observed by the
request handlers.

With several HTTP front processes (--api-server-count N), a scrape reaches whichever
front accepts it:
- the engine's gauges and counters (everything from the stats snapshot: requests
  running and waiting, KV blocks, prompt and generation tokens, ...) are engine-wide,
  the same from every front (each front gets them with every engine step);
- the request histograms and counters (strata_time_to_first_token_seconds, ...,
  strata_request_finished, strata_request_rejected) count that front's requests only;
  `strata_api_front_info{front, pid}` says which front answered. Summing them needs a
  scrape of every front (they are not merged).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "strata"
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip

# stats key -> (metric name, help)
GAUGES = {
    "num_running": ("num_requests_running", "Requests running in the engine."),
    "num_waiting": ("num_requests_waiting", "Requests waiting to be scheduled."),
    "kv_blocks_used": ("kv_blocks_used", "KV blocks held by running requests or the cache."),
    "kv_blocks_free": ("kv_blocks_free", "KV blocks free in the GPU pool."),
    "kv_blocks_total": ("kv_blocks_total", "KV blocks in the GPU pool."),
}
COUNTERS = {
    "prefix_cache_queried_tokens": ("prefix_cache_queries", "Prompt tokens looked up."),
    "prefix_cache_hit_tokens": ("prefix_cache_hits", "Prompt tokens found in the cache."),
    "num_preemptions": ("num_preemptions", "Sequences preempted for lack of KV blocks."),
    "num_prompt_tokens": ("prompt_tokens", "Prompt tokens received."),
    "num_generated_tokens": ("generation_tokens", "Tokens generated."),
    "prefix_cache_tier_hit_tokens": (
        "prefix_cache_tier_hits",
        "Prompt tokens loaded from a KV tier below the GPU.",
    ),
    "num_swaps": ("num_swaps", "Preemptions that pinned the victim's blocks in the CPU tier."),
}
# per-tier stats key suffix -> (metric name, help, counter?); labelled by tier
TIER_METRICS = {
    "hits": ("kv_tier_hits", "Blocks found in the tier.", True),
    "misses": ("kv_tier_misses", "Blocks looked up and not found in the tier.", True),
    "corrupt": ("kv_tier_corrupt", "Blocks rejected by header or checksum, then removed.", True),
    "errors": ("kv_tier_errors", "Failed tier I/O calls (the blocks were recomputed).", True),
    "evictions": ("kv_tier_evictions", "Blocks evicted from the tier.", True),
    "bytes_read": ("kv_tier_read_bytes", "Bytes read from the tier.", True),
    "bytes_written": ("kv_tier_written_bytes", "Bytes written to the tier.", True),
    "read_bytes_per_s": ("kv_tier_read_bytes_per_second", "Mean read rate while reading.", False),
    "write_bytes_per_s": (
        "kv_tier_write_bytes_per_second",
        "Mean write rate while writing.",
        False,
    ),
    "used_bytes": ("kv_tier_used_bytes", "Bytes held by the tier.", False),
    "capacity_bytes": ("kv_tier_capacity_bytes", "The tier's size cap in bytes.", False),
}

# MoE expert offloading (present only when the engine offloads experts);
# stats key (also the metric name) -> help
MOE_GAUGES = {
    "moe_expert_hit_rate": "Expert uses served from a GPU slot.",
    "moe_prefetch_precision": "Prefetched experts that were used.",
    "moe_prefetch_recall": "Used experts that were prefetched.",
    "moe_expert_slots": "GPU expert slots.",
    "moe_expert_slots_used": "GPU expert slots holding an expert.",
    "moe_budget_kv_bytes": "Arena bytes given to KV blocks.",
    "moe_budget_expert_bytes": "Arena bytes given to expert slots.",
}
MOE_COUNTERS = {
    "moe_expert_uses": "Expert uses (step, layer, expert with tokens).",
    "moe_expert_misses": "Experts copied to the GPU on demand.",
    "moe_experts_cpu_computed": "Missing experts run on the CPU.",
    "moe_expert_low_precision_loads": "Misses loaded from an int8/int4 copy.",
    "moe_bytes_moved": "Expert bytes copied host to device.",
    "moe_prefetch_loads": "Experts copied by cross-layer prefetch.",
    "moe_rebalances": "Moves of the KV/expert boundary.",
}

# The recall store (present only when the engine has one); stats key -> help
RECALL_GAUGES = {
    "recall_sequences": "Requests holding recall state (GPU working set, host slots).",
    "recall_blocks_attended_per_step": "Middle blocks a decode step attends per layer and head.",
    "recall_working_set_hit_rate": "Picked blocks already in the GPU working set.",
    "recall_host_bytes_used": "Host bytes of the recall store held by requests.",
    "recall_host_bytes": "Host bytes of the recall store.",
    "recall_host_table_bytes_used": "Host bytes reserved for magicpig's tables.",
    "recall_gpu_bytes_used": "GPU bytes held by recall sequences.",
    "recall_pages": "Recall pages: GPU tensors shared by sequences of one kind.",
    "recall_prefix_blocks_indexed": "Prompt blocks published in the recall store's prefix index.",
    "recall_host_slots_shared": "Recall store host slots held by two requests or more.",
    "recall_host_bytes_cached": "Host bytes of published blocks no request holds (evictable).",
    "recall_prefetch_precision": "Picks of sparse layers their cross-layer prefetch guessed.",
    "recall_keys_sampled_per_layer_head": "Keys a sampling policy attends per layer and head.",
    "recall_sampled_on_host_share": "Sampled layers attended on the host (not the device).",
    "recall_sampled_host_ms_per_layer": "Host worker ms per sampled layer (magicpig).",
    "recall_sampled_wait_ms_per_layer": "Engine thread ms waiting per sampled layer (magicpig).",
}
RECALL_COUNTERS = {
    "recall_decode_steps": "Decode steps of recall sequences.",
    "recall_bytes_fetched": "Bytes fetched from the recall store to the GPU.",
    "recall_prefetch_bytes": "Bytes the cross-layer prefetch fetched from the recall store.",
    "recall_working_set_hits": "Picked blocks already in the GPU working set.",
    "recall_working_set_misses": "Picked blocks fetched into the GPU working set.",
    "recall_graph_replays": "Sparse layers of recall decode steps replayed from CUDA graphs.",
    "recall_prefix_blocks_reused": "Prompt blocks recall requests reused from the store.",
    "recall_prefix_blocks_published": "Prompt blocks published in the recall store.",
    "recall_host_slots_evicted": "Cached recall store slots taken for new blocks.",
}
# Whole recall decode steps as CUDA graphs (present only when the engine captures them)
RECALL_STEP_GRAPH_GAUGES = {
    "recall_step_graphs": "Recall decode-step CUDA graphs kept (sets of rows).",
}
RECALL_STEP_GRAPH_COUNTERS = {
    "recall_step_graph_replays": "Recall decode steps replayed whole from one CUDA graph.",
    "recall_step_graph_captures": "Recall decode steps captured as CUDA graphs.",
}

# Tensor parallelism (present only when the engine is sharded); stats key -> help
TP_GAUGES = {"tensor_parallel_size": "Ranks the model is sharded over."}
TP_COUNTERS = {
    "tp_steps": "Steps sent to the tensor-parallel workers.",
    "tp_step_send_seconds": "Rank 0's time sending steps to the workers (encode and send).",
    "tp_allreduce_seconds": "Rank 0's time in all-reduces, waiting for the other ranks included.",
    "tp_allreduces": "All-reduces run by rank 0.",
}


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        if stats is None:
            return
        stats = {**stats, "kv_blocks_used": stats["kv_blocks_total"] - stats["kv_blocks_free"]}
        for key, (name, doc) in GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=stats[key])
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=stats[key])
        yield from _tier_metrics(stats)
        if "moe_expert_uses" in stats:
            yield from _moe_metrics(stats)
        if "tensor_parallel_size" in stats:
            yield from _named(stats, TP_GAUGES, TP_COUNTERS)
        if "recall_host_bytes" in stats:
            yield from _named(stats, RECALL_GAUGES, RECALL_COUNTERS)
            yield _per_layer(
                stats["recall_prefetch_precision_per_layer"], "recall_prefetch_precision_layer",
                "Picks of a sparse layer its cross-layer prefetch guessed.",
            )
        if "recall_step_graphs" in stats:
            yield from _named(stats, RECALL_STEP_GRAPH_GAUGES, RECALL_STEP_GRAPH_COUNTERS)


def _named(
    stats: dict[str, Any], gauges: dict[str, str], counters: dict[str, str]
) -> Iterator[Metric]:
    """Gauges and counters named after their stats keys (stats key -> help)."""
    for key, doc in gauges.items():
        yield GaugeMetricFamily(f"{PREFIX}_{key}", doc, value=stats[key])
    for key, doc in counters.items():
        yield CounterMetricFamily(f"{PREFIX}_{key}", doc, value=stats[key])


def _tier_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    tiers = [k[len("kv_tier_") : -len("_capacity_bytes")] for k in stats
             if k.startswith("kv_tier_") and k.endswith("_capacity_bytes")]  # fmt: skip
    if not tiers:
        return
    for suffix, (name, doc, counter) in TIER_METRICS.items():
        family_type = CounterMetricFamily if counter else GaugeMetricFamily
        family = family_type(f"{PREFIX}_{name}", doc, labels=["tier"])
        for tier in tiers:
            family.add_metric([tier], stats[f"kv_tier_{tier}_{suffix}"])
        yield family


def _moe_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    yield from _named(stats, MOE_GAUGES, MOE_COUNTERS)
    yield _per_layer(stats["moe_expert_hit_rate_per_layer"], "moe_expert_hit_rate_layer",
                     "Expert cache hit rate per layer.")  # fmt: skip


def _per_layer(values: dict[int, float], name: str, doc: str) -> Metric:
    """A gauge with a `layer` label, one sample per layer of `values`."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["layer"])
    for layer, value in values.items():
        family.add_metric([str(layer)], value)
    return family


class ServerMetrics:
    def __init__(
        self, snapshot: Callable[[], dict[str, Any] | None], front: int | None = None
    ) -> None:
        """front: this server is one of several HTTP fronts, with this index."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot))
        if front is not None:
            Gauge(
                f"{PREFIX}_api_front_info", "The HTTP front process that answered this scrape.",
                ["front", "pid"], registry=self.registry,
            ).labels(front=str(front), pid=str(os.getpid())).set(1)  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token.",
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Time from arrival to the last token.",
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.finished = Counter(
            f"{PREFIX}_request_finished", "Requests finished, by reason.",
            ["finish_reason"], registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            f"{PREFIX}_request_rejected", "Requests refused before running, by HTTP status.",
            ["status"], registry=self.registry,
        )  # fmt: skip

    def observe(
        self, ttft: float | None, e2e: float, num_output_tokens: int, finish_reason: str | None
    ) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_output_tokens - 1))
        self.e2e.observe(e2e)
        self.finished.labels(finish_reason=finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
