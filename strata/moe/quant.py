"""Low-precision copies of experts for mixed precision on a miss (HOBBIT-style).

Each weight row (output channel) is quantized symmetrically with its own float32 scale:

    int8: q = round(w / s), s = max|w_row| / 127, q in [-127, 127], one byte per weight
    int4: q = round(w / s), s = max|w_row| / 7,   q in [-7, 7], two weights per byte:
          byte = (q[2i] + 8) | (q[2i + 1] + 8) << 4

A flat expert (gate_up rows then down rows, see host_store.py) is a list of row blocks
of different widths, so quantization works on one [rows, cols] matrix at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = {"int8": 8, "int4": 4}


@dataclass
class QuantizedRows:
    """A [rows, cols] matrix: payload (int8 [rows, cols] or uint8 [rows, cols // 2])
    and per-row float32 scales [rows]."""

    payload: torch.Tensor
    scale: torch.Tensor
    bits: int

    @property
    def nbytes(self) -> int:
        return self.payload.numel() * self.payload.element_size() + self.scale.numel() * 4


def quantize_rows(w: torch.Tensor, bits: int) -> QuantizedRows:
    """Quantize the rows of w [..., rows, cols] (any float dtype) to `bits` (8 or 4)."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    qmax = 127 if bits == 8 else 7
    wf = w.float()
    scale = wf.abs().amax(dim=-1).clamp_min(1e-12) / qmax
    q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 8:
        return QuantizedRows(q, scale, 8)
    if q.shape[-1] % 2:
        raise ValueError(f"int4 needs an even number of columns, got {q.shape[-1]}")
    u = (q + 8).to(torch.uint8)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return QuantizedRows(packed, scale, 4)


def dequantize_rows(
    payload: torch.Tensor, scale: torch.Tensor, bits: int, out: torch.Tensor
) -> None:
    """Write the dequantized [rows, cols] matrix into `out` (its dtype)."""
    if bits == 8:
        q = payload.float()
    else:
        low = (payload & 0x0F).to(torch.int8) - 8
        high = (payload >> 4).to(torch.int8) - 8
        q = torch.stack((low, high), dim=-1).flatten(-2).float()
    out.copy_(q * scale.unsqueeze(-1))
