"""The routed experts of a Mixture-of-Experts model, behind one narrow interface.

Each MoE block (strata/models/moe.py) owns its router and shared expert; the routed
experts of every layer are computed by one `RoutedExperts` object that the model holds:

    block(x):  routed.prefetch(layer, x)                       # may start copies early
               ids, weights = block.router.select(x)           # exactly as transformers
               y = routed.forward(layer, x, ids, weights)      # [T, H]
               y += sigmoid(shared_gate(x)) * shared_expert(x) # Qwen2-MoE only

`ResidentExperts` keeps every expert where its weights are (all on the GPU, or all on
the CPU). An offloading implementation takes the stacked weights instead:

    loaded = load_model(spec, device, dtype, None, seed, expert_device=torch.device("cpu"))
    weights = loaded.model.expert_weights          # list[ExpertWeights], one per MoE layer,
                                                   # on the CPU (pinned when device is CUDA)
    loaded.model.set_routed_experts(MyOffloader(weights, loaded.model))

and may call `model.layers[i + 1].mlp.router.select(x)` for cross-layer prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from strata.ops.grouped_experts import ExpertRows, expert_forward, run_experts

__all__ = [
    "ExpertWeights",
    "ResidentExperts",
    "RoutedExperts",
    "combine",
    "expert_forward",
    "group_by_expert",
]


class RoutedExperts(Protocol):
    """Computes the routed experts of every MoE layer; the MoE block owns router and shared
    expert. Implementations are plain objects, not nn.Modules (one instance serves every
    layer, so it must not register as a submodule of each)."""

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H] (the normed MLP input), topk_ids [T, k] int64, topk_weights [T, k]
        (x.dtype or fp32) -> [T, H] in x.dtype on x.device:
        sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]),
        expert(x) = down(silu(gate(x)) * up(x))."""
        ...

    def prefetch(self, layer: int, x: torch.Tensor) -> None:
        """Called by layer `layer`'s MoE block with its MLP input x before it routes; an
        offloading implementation may apply layer+1's router to x and start copying.
        Residents: no-op."""
        ...


@dataclass
class ExpertWeights:
    """One MoE layer's routed experts, stacked in transformers' in-memory layout.

    gate_up [E, 2F, H]: rows [0, F) are gate, [F, 2F) are up; down [E, H, F].
    """

    layer: int
    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        e, two_f, h = self.gate_up.shape
        if two_f % 2 or self.down.shape != (e, h, two_f // 2):
            raise ValueError(
                f"layer {self.layer}: gate_up {tuple(self.gate_up.shape)} and down "
                f"{tuple(self.down.shape)} are not [E, 2F, H] and [E, H, F]"
            )

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def bytes_per_expert(self) -> int:
        return (self.gate_up[0].numel() + self.down[0].numel()) * self.gate_up.element_size()

    @classmethod
    def empty(
        cls,
        layer: int,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        device: torch.device,
        pin_memory: bool = False,
    ) -> ExpertWeights:
        """Uninitialised weights; pin_memory applies to CPU tensors."""
        shapes = (
            (num_experts, 2 * intermediate_size, hidden_size),
            (num_experts, hidden_size, intermediate_size),
        )
        gate_up, down = (
            torch.empty(s, dtype=dtype, device=device, pin_memory=pin_memory) for s in shapes
        )
        return cls(layer, gate_up, down)


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(order, counts): order [T*k] lists the flat (token, slot) rows sorted by expert
    (stable), counts[e] how many rows expert e takes. Reads counts on the host: a sync."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


def combine(
    rows_out: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Weighted sum over each token's k experts: rows_out [T*k, H] in `order`'s sorted order
    -> [T, H] in dtype. Sums in a fixed order (slot 0 first), whatever computed the rows."""
    tokens, k = topk_weights.shape
    unsorted = torch.empty_like(rows_out)
    unsorted[order] = rows_out
    weighted = unsorted.view(tokens, k, -1) * topk_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(dtype)


class ResidentExperts:
    """Every expert stays where its weights are; computes there (x moves if needed).

    Tokens sorted by expert; on CUDA one grouped kernel pair computes every used expert
    (grouped.py, slot = expert id in the stacked weights), elsewhere one pair of GEMMs per
    used expert; no loop over tokens. The expert counts are read on the host, so
    a forward is not CUDA-graph capturable.
    """

    def __init__(self, weights: list[ExpertWeights]) -> None:
        self.weights = {w.layer: w for w in weights}

    def prefetch(self, layer: int, x: torch.Tensor) -> None:
        return None

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        w = self.weights[layer]
        device = w.gate_up.device
        xd, ids = x.to(device), topk_ids.to(device)
        order, counts = group_by_expert(ids, w.num_experts)
        k = ids.shape[1]
        rows_in = xd[order // k]
        rows_out = torch.empty_like(rows_in)
        experts: list[ExpertRows] = []
        start = 0
        for expert, n in enumerate(counts):
            if n:
                experts.append(ExpertRows(start, n, w.gate_up[expert], w.down[expert]))
                start += n
        run_experts(rows_in, rows_out, experts)
        return combine(rows_out, order, topk_weights.to(device), x.dtype).to(x.device)
