"""Rotary position embeddings, with the frequencies transformers computes for the config.

The inverse frequencies come from transformers' own rope initialisers (default, linear,
llama3, yarn, ...), so scaled variants match the reference exactly. Rope types whose
frequencies change with sequence length (dynamic, longrope) are not supported.
"""

from __future__ import annotations

from typing import Any

import torch

from strata.errors import UnsupportedModelError
from strata.ops.rotate_half import rotate_half

_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = {"rope_type": "default", "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
    return dict(params)


def inverse_frequencies(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention scaling) for the config's rope type."""
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(_STATIC_ROPE_TYPES)}"
        )
    if rope_type == "default":
        base = params["rope_theta"]
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position up to `max_positions`, applied half-rotated."""

    cos: torch.Tensor  # [max_positions, head_dim] float32 (buffers)
    sin: torch.Tensor

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        with torch.device("cpu"):  # real values even while a model is built on "meta"
            inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
            freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, dim], k: [tokens, kv_heads, dim] -> rotated q, k."""
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

