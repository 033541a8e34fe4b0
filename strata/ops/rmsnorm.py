"""RMSNorm, and residual add + RMSNorm in one pass.

Rounding follows transformers in both paths:

    s = x + residual                  (input dtype)
    n = (s.float() * rsqrt(mean(s.float()^2) + eps)).to(dtype)
    y = weight * n                    (input dtype)

The fused Triton kernel (CUDA; triton_rmsnorm.py) reads x and residual once and writes
s and y once; only the order of the float32 sum of squares differs from torch.
"""

from __future__ import annotations

import torch


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual); residual None means plain rmsnorm of x."""
    if fused and x.is_cuda and x.dtype == weight.dtype and x.dim() == 2:
        from strata.ops.triton_rmsnorm import add_rmsnorm_cuda

        return add_rmsnorm_cuda(x, residual, weight, eps)
    s = x if residual is None else x + residual
    return rmsnorm_torch(s, weight, eps), s
