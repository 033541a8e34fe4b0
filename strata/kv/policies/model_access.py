"""ModelAccess: what a policy may need of the model beyond attention scores.

Most policies score tokens from the attention they observe. Two need more:
expected_attention rotates query statistics to future positions (RoPE frequencies), and
kvzip builds a reconstruction prompt (the tokenizer). The engine hands every policy one
`ModelAccess` through `KVPolicy.bind` right after creating it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelAccess:
    inv_freq: torch.Tensor  # [head_dim // 2] float32: the model's RoPE inverse frequencies
    rope_scaling: float  # the attention scaling folded into cos and sin (yarn), else 1
    tokenizer: Any | None  # the HF tokenizer; None for models served by token ids

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [n, head_dim] float32 at `positions`, computed as the model's tables
        (strata/models/rope.py) are."""
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling
