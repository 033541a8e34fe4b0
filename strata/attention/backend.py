"""The attention backend interface.

A step's batch is a flat run of query tokens, sequence after sequence. Sequence i
contributes `query_lens[i]` tokens at positions
[context_lens[i] - query_lens[i], context_lens[i]), and attends causally over its first
`context_lens[i]` tokens of KV, which live in the blocks `block_tables[i]`. The current
tokens' K/V are written to the cache (at `slot_mapping`) before attention reads it, so
a prefill chunk attends over cached prefix blocks and itself alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from strata.registry import Registry


@dataclass(frozen=True)
class BatchLayout:
    """Host-side description of one step's sequences (see module docstring)."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int

    def __post_init__(self) -> None:
        if not len(self.query_lens) == len(self.context_lens) == len(self.block_tables):
            raise ValueError("query_lens, context_lens and block_tables differ in length")


@dataclass(frozen=True)
class LayerwiseMetadata:
    """A step's metadata per layer, for steps where layers attend over different KV
    lengths (a per-layer KV budget); the model hands layer i `per_layer[i]`."""

    per_layer: list[Any]

    def for_layer(self, layer: int) -> Any:
        return self.per_layer[layer]


class AttentionBackend(ABC):
    """Paged attention: writes a step's K/V into the cache and attends over block tables.

    `prepare` runs once per step and returns backend-specific metadata (device tensors);
    `write_kv` and `attend` run once per layer with that metadata.
    """

    name: str

    @abstractmethod
    def prepare(self, layout: BatchLayout, slot_mapping: torch.Tensor, device: torch.device) -> Any:
        """Build the per-step metadata that `write_kv` and `attend` need."""

    @abstractmethod
    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Any,
    ) -> None:
        """Store k, v ([tokens, kv_heads, head_dim]) at the step's slots of one layer."""

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        scale: float,
    ) -> torch.Tensor:
        """q: [tokens, heads, head_dim] -> output of the same shape."""


# Imported on demand: CPU installs without triton still get the reference backend.
BACKENDS: Registry[type[AttentionBackend]] = Registry("attention backend", {
    "reference": "strata.attention.reference:ReferenceAttention",
    "triton": "strata.attention.triton_backend:TritonAttention",
})  # fmt: skip


def get_backend(name: str) -> AttentionBackend:
    """A new instance of the backend registered under `name`."""
    return BACKENDS.get(name)()


def choose_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """(backend name, why) for an `attention_backend` setting: "auto" takes triton on
    CUDA when triton imports, else the reference; a named backend is taken as asked."""
    if requested != "auto":
        return requested, "asked for by attention_backend"
    if device.type != "cuda":
        return "reference", f"auto: device is {device.type}, triton kernels need CUDA"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return "reference", f"auto: triton does not import ({exc})"
    return "triton", "auto: CUDA device and triton imports"
