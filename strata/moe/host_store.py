"""Routed experts in (pinned) CPU memory: the backing store of the GPU expert cache.

It wraps the model's stacked `ExpertWeights` (no copy). A GPU slot holds one expert
flat, gate_up then down, so a miss is two contiguous copies:

    slot: [ gate_up: 2F x H (gate rows, then up rows) | down: H x F ]

With a miss precision of int8/int4, each expert also gets a low-precision copy, one
contiguous byte row (quant.py gives the payload encoding):

    [ gate_up payload | down payload | gate_up scales (2F float32) | down scales (H float32) ]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strata.models.routed_experts import ExpertWeights
from strata.moe.quant import BITS, dequantize_rows, quantize_rows

PRECISIONS = ("full", "int8", "int4")


class HostExpertStore:
    """Per MoE layer: the stacked experts, and optional low-precision copies."""

    def __init__(self, weights: Sequence[ExpertWeights], low_precision: str = "full") -> None:
        if low_precision not in PRECISIONS:
            raise ValueError(
                f"expert miss precision must be one of {', '.join(PRECISIONS)}; "
                f"got {low_precision!r}"
            )
        if not weights:
            raise ValueError("a host expert store needs at least one MoE layer")
        self.weights = {w.layer: w for w in weights}
        first = weights[0]
        self.num_experts, two_f, self.hidden_size = first.gate_up.shape
        self.intermediate_size = two_f // 2
        self.dtype = first.gate_up.dtype
        self.layers = sorted(self.weights)
        self.expert_numel = 3 * self.intermediate_size * self.hidden_size
        self.expert_bytes = first.bytes_per_expert
        self.low_precision = low_precision
        self._low: dict[int, torch.Tensor] = {}
        if low_precision != "full":
            pin = first.gate_up.is_pinned()
            for layer in self.layers:
                self._low[layer] = self._quantize_layer(self.weights[layer], pin)

    # ---- full precision --------------------------------------------------------------------

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2F, H], down [H, F]) of one expert, in host memory."""
        w = self.weights[layer]
        return w.gate_up[expert], w.down[expert]

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2F, H], down [H, F]) views of a flat expert [3*F*H] (a slot)."""
        f, h = self.intermediate_size, self.hidden_size
        return flat[: 2 * f * h].view(2 * f, h), flat[2 * f * h :].view(h, f)

    def copy_into(self, layer: int, expert: int, flat: torch.Tensor) -> None:
        """Copy one expert into a flat slot (non-blocking from pinned memory)."""
        for dst, src in zip(self.split(flat), self.expert(layer, expert), strict=True):
            dst.copy_(src, non_blocking=True)

    # ---- low precision ---------------------------------------------------------------------

    @property
    def low_bits(self) -> int:
        return BITS[self.low_precision]

    @property
    def low_bytes(self) -> int:
        """Bytes of one expert's low-precision row (payload and scales)."""
        f, h = self.intermediate_size, self.hidden_size
        return 3 * f * h * self.low_bits // 8 + (2 * f + h) * 4

    def _quantize_layer(self, w: ExpertWeights, pin: bool) -> torch.Tensor:
        rows = torch.empty(self.num_experts, self.low_bytes, dtype=torch.uint8, pin_memory=pin)
        for e in range(self.num_experts):  # one expert at a time bounds the float32 temporaries
            qg = quantize_rows(w.gate_up[e], self.low_bits)
            qd = quantize_rows(w.down[e], self.low_bits)
            parts = self.split_low(rows[e])
            for dst, src in zip(parts, (qg.payload, qd.payload, qg.scale, qd.scale), strict=True):
                dst.copy_(src)
        return rows

    def low(self, layer: int, expert: int) -> torch.Tensor:
        return self._low[layer][expert]

    def split_low(
        self, row: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (gate_up payload, down payload, gate_up scales, down scales) of one byte row."""
        f, h, bits = self.intermediate_size, self.hidden_size, self.low_bits
        pdt = torch.int8 if bits == 8 else torch.uint8
        g_cols, d_cols = h * bits // 8, f * bits // 8
        a, b, c, d = row.split([2 * f * g_cols, h * d_cols, 2 * f * 4, h * 4])
        return (
            a.view(pdt).view(2 * f, g_cols),
            b.view(pdt).view(h, d_cols),
            c.view(torch.float32),
            d.view(torch.float32),
        )

    def dequantize_into(self, row: torch.Tensor, flat_out: torch.Tensor) -> None:
        """Dequantize one low-precision byte row into a flat expert (any device)."""
        gp, dp, gs, ds = self.split_low(row)
        gate_up, down = self.split(flat_out)
        dequantize_rows(gp, gs, self.low_bits, gate_up)
        dequantize_rows(dp, ds, self.low_bits, down)

    @property
    def nbytes(self) -> int:
        full = len(self.layers) * self.num_experts * self.expert_bytes
        return full + sum(t.numel() for t in self._low.values())
