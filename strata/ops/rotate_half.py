"""rotate_half: RoPE's pairing of a head's two halves, x = [x1, x2] -> [-x2, x1]."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
