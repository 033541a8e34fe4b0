"""Triton kernel of SiLU-and-mul (see activation.py for the rounding)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * inter + cols, (act * up).to(gate.dtype), mask=mask)


def silu_and_mul_cuda(gate_up: torch.Tensor) -> torch.Tensor:
    """One pass: reads gate and up once, writes the product once."""
    inter = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    rows = gate_up.shape[0]
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out
