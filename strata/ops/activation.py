"""SiLU-and-mul: silu(gate) * up over the fused gate_up projection.

Both paths round as torch's F.silu(gate) * up in the input dtype: silu in float32,
rounded, then multiplied and rounded. The Triton kernel (CUDA; triton_activation.py)
reads gate_up once and writes the product once instead of three elementwise passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    """gate_up: [tokens, 2 * inter] (gate first) -> [tokens, inter]."""
    if fused and gate_up.is_cuda and gate_up.dim() == 2:
        from strata.ops.triton_activation import silu_and_mul_cuda

        return silu_and_mul_cuda(gate_up)
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up
