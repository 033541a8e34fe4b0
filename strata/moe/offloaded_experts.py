"""OffloadedExperts: the RoutedExperts of a model whose experts live in host memory.

One layer's forward, for the experts its tokens picked (grouped as ResidentExperts does,
so the numbers are the same whichever path computes an expert):

    1 one host sync: per-expert token counts, max gate weight, and the experts layer+1's
      router predicted from this layer's input (see `prefetch`)
    2 hits are pinned; each miss is either
        - computed on the CPU (cost model: cheaper than the copy for its tokens), or
        - copied into a slot on the copy stream, at low precision if its largest gate
          weight is under the threshold (mixed precision on miss), else full;
      when every slot is pinned, the pinned experts are computed first ("a wave"),
      which frees their slots: any capacity >= 1 slot is correct, only slower
    3 copies of layer+1's predicted experts are queued behind this layer's misses
    4 CPU experts' rows go to the host, GPU experts run (the compute stream waits for the
      copies of the wave's experts, then one grouped kernel pair computes them all, see
      grouped.py), CPU experts run meanwhile and their rows come back
    5 the rows are combined in a fixed order (routed.combine)

The naive baseline (`naive=True`) copies every used expert on every forward: no reuse,
no prefetch, no CPU compute.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from strata.models.routed_experts import combine, expert_forward
from strata.moe.cost_model import OffloadCostModel
from strata.moe.expert_cache import ExpertCache
from strata.moe.offload_stats import OffloadCounters
from strata.ops.grouped_experts import ExpertRows, run_experts


class ExpertRouter(Protocol):
    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


CPU_COMPUTE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class OffloadOptions:
    prefetch: bool = True
    cpu_compute: str = "auto"  # auto: the cost model decides; on: every miss; off: never
    low_precision_threshold: float = 0.0  # misses whose max gate weight is below go low
    naive: bool = False

    def __post_init__(self) -> None:
        if self.cpu_compute not in CPU_COMPUTE_MODES:
            raise ValueError(
                f"cpu_compute must be one of {', '.join(CPU_COMPUTE_MODES)}; "
                f"got {self.cpu_compute!r}"
            )


@dataclass(frozen=True)
class _Routing:
    """One layer's routing on the host."""

    counts: list[int]  # tokens per expert
    max_weight: list[float]  # largest gate weight per expert
    predicted_next: list[int]  # experts the cross-layer gate predicts for the next layer

    @property
    def used(self) -> list[int]:
        return [e for e, c in enumerate(self.counts) if c]

    def starts(self) -> list[int]:
        """Each expert's first row in the expert-sorted rows."""
        out, total = [], 0
        for c in self.counts:
            out.append(total)
            total += c
        return out


@dataclass(frozen=True)
class _ExpertRows:
    rows_in: torch.Tensor  # the layer's token rows, sorted by expert
    rows_out: torch.Tensor
    starts: list[int]
    counts: list[int]


class OffloadedExperts:
    def __init__(
        self,
        cache: ExpertCache,
        routers: Mapping[int, ExpertRouter],
        options: OffloadOptions,
        cost_model: OffloadCostModel | None = None,
    ) -> None:
        if options.cpu_compute == "auto" and cost_model is None:
            raise ValueError("cpu_compute='auto' needs a measured cost model")
        self.cache = cache
        self.store = cache.store
        self.routers = dict(routers)
        self.options = options
        self.cost_model = cost_model
        self.device = cache.device
        layers = self.store.layers
        self._next_layer = dict(itertools.pairwise(layers))
        self._pending: tuple[int, torch.Tensor] | None = None  # (next layer, predicted mask)
        self._predicted: dict[int, list[int]] = {}  # layer -> experts predicted for it
        self._prefetched: set[tuple[int, int]] = set()  # loaded by prefetch, not yet used
        self.counters = OffloadCounters()
        self._cpu_cutoff = cost_model.max_cpu_tokens() if cost_model is not None else 0

    # ---- RoutedExperts -----------------------------------------------------------------------

    def prefetch(self, layer: int, x: torch.Tensor) -> None:
        """Apply the next MoE layer's router to this layer's input; its experts are read
        with this layer's routing (one sync) and copied behind this layer's misses."""
        nxt = self._next_layer.get(layer)
        if not self.options.prefetch or self.options.naive or nxt is None:
            return
        ids, _ = self.routers[nxt].select(x)
        mask = torch.zeros(self.store.num_experts, dtype=torch.float32, device=x.device)
        mask[ids.reshape(-1)] = 1.0
        self._pending = (nxt, mask)

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        pending, self._pending = self._pending, None
        routing = self._routing_on_host(flat, topk_weights, pending)  # the layer's one sync
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.counters.record_prediction(predicted, routing.used)
        rows_in = x[order // k]
        rows_out = torch.empty_like(rows_in)
        rows = _ExpertRows(rows_in, rows_out, routing.starts(), routing.counts)
        gpu, misses = self._take_hits(layer, routing)
        cpu = self._split_cpu(misses, routing.counts)
        if cpu:
            misses = [e for e in misses if e not in cpu]
            self.counters.layer(layer).cpu += len(cpu)
        gpu = self._load_misses(layer, misses, routing, gpu, rows)
        for e in cpu:  # cache CPU-computed experts too, while that evicts nothing
            if not self.cache.has_free_slot():
                break
            self.cache.load((layer, e), "full")
        if pending is not None:
            self._predicted[pending[0]] = routing.predicted_next
            self._issue_prefetch(pending[0], routing.predicted_next)
        cpu_rows = self._rows_to_host(rows_in, cpu, rows.starts, rows.counts)
        self._run_gpu(layer, gpu, rows_in, rows_out, rows.starts, rows.counts)
        self._run_cpu(layer, cpu, cpu_rows, rows_out, rows.starts, rows.counts)
        return combine(rows_out, order, topk_weights, x.dtype)

    def _routing_on_host(
        self,
        flat: torch.Tensor,
        topk_weights: torch.Tensor,
        pending: tuple[int, torch.Tensor] | None,
    ) -> _Routing:
        """Per expert: its token count and largest gate weight, and the next layer's
        predicted experts if a prediction is pending, copied to the host in one sync."""
        num_experts = self.store.num_experts
        counts = torch.bincount(flat, minlength=num_experts)
        max_weight = torch.zeros(num_experts, dtype=torch.float32, device=flat.device)
        max_weight.scatter_reduce_(0, flat, topk_weights.reshape(-1).float(), "amax")
        parts = [counts.float(), max_weight]
        if pending is not None:
            parts.append(pending[1])
        host = torch.cat(parts).cpu().tolist()
        next_mask = host[2 * num_experts :]
        return _Routing(
            counts=[int(c) for c in host[:num_experts]],
            max_weight=host[num_experts : 2 * num_experts],
            predicted_next=[e for e, p in enumerate(next_mask) if p],
        )

    def _take_hits(self, layer: int, routing: _Routing) -> tuple[list[tuple[int, int]], list[int]]:
        """([(expert, slot)] of the used experts the cache holds, now pinned; the misses)."""
        gpu: list[tuple[int, int]] = []
        misses: list[int] = []
        stats = self.counters.layer(layer)
        for e in routing.used:
            key = (layer, e)
            need_full = routing.max_weight[e] >= self.options.low_precision_threshold
            slot = None if self.options.naive else self.cache.lookup(key, need_full)
            if slot is None:
                misses.append(e)
                continue
            if key in self._prefetched:
                stats.prefetch_hits += 1
            else:
                stats.hits += 1
            self._prefetched.discard(key)
            self.cache.pin(slot)
            gpu.append((e, slot))
        return gpu, misses

    def _load_misses(
        self,
        layer: int,
        misses: list[int],
        routing: _Routing,
        gpu: list[tuple[int, int]],
        rows: _ExpertRows,
    ) -> list[tuple[int, int]]:
        """Copy each miss into a slot (low precision where its gate weights allow); when
        every slot is pinned, the pinned experts are computed first to free them."""
        stats = self.counters.layer(layer)
        for e in misses:
            precision = "full"
            if routing.max_weight[e] < self.options.low_precision_threshold:
                precision = self.store.low_precision
            slot = self.cache.load((layer, e), precision)
            if slot is None:  # every slot pinned: compute what is pinned, then retry
                self._run_gpu(layer, gpu, rows.rows_in, rows.rows_out, rows.starts, rows.counts)
                gpu = []
                slot = self.cache.load((layer, e), precision)
                if slot is None:
                    raise RuntimeError("the expert cache has no slot (capacity 0)")
            self._prefetched.discard((layer, e))
            stats.misses += 1
            stats.low_precision_loads += precision != "full"
            self.cache.pin(slot)
            gpu.append((e, slot))
        return gpu

    # ---- pieces ------------------------------------------------------------------------------

    def _split_cpu(self, misses: list[int], counts: list[int]) -> list[int]:
        """The misses to compute on the CPU. "auto" balances two queues, the link and the
        CPU: each miss (fewest tokens first) goes where it would finish sooner, so the
        CPU takes small misses while the link is busy, and none when copying is cheaper."""
        mode = self.options.cpu_compute
        if self.options.naive or mode == "off" or not misses:
            return []
        if mode == "on":
            return list(misses)
        model = self.cost_model
        assert model is not None
        copy_s = model.copy_seconds()
        link_busy = cpu_busy = 0.0
        cpu: list[int] = []
        for e in sorted(misses, key=lambda e: counts[e]):
            if counts[e] > self._cpu_cutoff:
                link_busy += copy_s
                continue
            cpu_s = model.cpu_compute_seconds(counts[e])
            if cpu_busy + cpu_s < link_busy + copy_s:
                cpu.append(e)
                cpu_busy += cpu_s
            else:
                link_busy += copy_s
        return sorted(cpu)

    def _issue_prefetch(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            key = (layer, e)
            if key in self.cache.slot_of:
                continue
            if self.cache.load(key, "full") is None:
                return  # every slot pinned
            self._prefetched.add(key)
            self.counters.prefetch_loads += 1
            self.counters.prefetch_bytes += self.store.expert_bytes

    def _run_gpu(
        self,
        layer: int,
        work: list[tuple[int, int]],
        rows_in: torch.Tensor,
        rows_out: torch.Tensor,
        starts: list[int],
        counts: list[int],
    ) -> None:
        """Every expert of `work` in one grouped launch (grouped.py) once the compute stream
        waited for each slot's copy; the torch loop on the CPU."""
        experts: list[ExpertRows] = []
        for e, slot in work:
            self.cache.wait_ready(slot)
            gate_up, down = self.store.split(self.cache.view(slot))
            experts.append(ExpertRows(starts[e], counts[e], gate_up, down))
        run_experts(rows_in, rows_out, experts)
        self.cache.release_pins()

    def _rows_to_host(
        self, rows_in: torch.Tensor, experts: list[int], starts: list[int], counts: list[int]
    ) -> list[torch.Tensor]:
        return [rows_in[starts[e] : starts[e] + counts[e]].to("cpu") for e in experts]

    def _run_cpu(
        self,
        layer: int,
        experts: list[int],
        host_rows: list[torch.Tensor],
        rows_out: torch.Tensor,
        starts: list[int],
        counts: list[int],
    ) -> None:
        for e, xs in zip(experts, host_rows, strict=True):
            gate_up, down = self.store.expert(layer, e)
            y = expert_forward(xs, gate_up, down)
            rows_out[starts[e] : starts[e] + counts[e]] = y.to(rows_out.device, non_blocking=False)

    # ---- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        return {
            **self.counters.as_stats(),
            "moe_bytes_moved": self.cache.bytes_moved,
            "moe_expert_slots": self.cache.capacity,
            "moe_expert_slots_used": self.cache.num_resident,
        }
