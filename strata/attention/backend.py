"""The attention backend interface: the only seam between the model and attention.

A step's batch is a flat run of query tokens, sequence after sequence. Sequence i
contributes `query_lens[i]` tokens at positions
[context_lens[i] - query_lens[i], context_lens[i]), and attends causally over its first
`context_lens[i]` tokens of KV, which live in the blocks `block_tables[i]`. The current
tokens' K/V are written to the cache (at `slot_mapping`) before attention reads it, so
a prefill chunk attends over cached prefix blocks and itself alike.

Per step and per layer:

    runner   meta = backend.prepare(layout, slot_mapping, device)       once per step
    layer    qkv = qkv_proj(x)
             q, k_read, v_read = backend.write_rope_kv(layer, qkv, inputs, meta)
             observer(layer, q, scale)                                   (KV policies)
             out = backend.attend(q, k_read, v_read, meta, scale)
             o_proj(out)

A backend may also start a layer's work a layer early: `lookahead` (once per forward)
returns a function the model calls with layer i+1 and layer i's input, before layer i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic

import torch
from torch import Tensor

from strata.attention.layer_inputs import AttentionInputs, AttentionLayer, Rotary
from strata.attention.metadata import AttentionMetadata, LayerwiseMetadata, M, StepMetadata
from strata.registry import Registry

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BatchLayout",
    "LayerwiseMetadata",
    "StepMetadata",
    "choose_backend",
    "get_backend",
]


# (layer, residual stream rows [n, hidden]) -> that layer's pre-RoPE queries [n, q_size]
QueryOf = Callable[[int, Tensor], Tensor]
# (layer j, x, residual): layer j-1's input is x + residual (x alone when residual is None)
Lookahead = Callable[[int, Tensor, Tensor | None], None]


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


class AttentionBackend(ABC, Generic[M]):
    """Paged attention: writes a step's K/V into the cache and attends over block tables.

    `prepare` runs once per step and returns the backend's metadata M (device tensors);
    `write_rope_kv` (or `write_kv`) and `attend` run once per layer with it and never
    sync with the host.

    Capabilities:
    graph_safe          decode steps may be captured in CUDA graphs; the backend then
                        implements the capture hooks (`graph_metadata`, `graph_rows`,
                        `fill_graph_metadata`)
    per_layer_metadata  `prepare` may run more than once per step, for layers that attend
                        over different KV (`prepare_layers`)
    """

    name: str
    graph_safe: ClassVar[bool] = False
    per_layer_metadata: ClassVar[bool] = True

    @abstractmethod
    def prepare(self, layout: BatchLayout, slot_mapping: Tensor, device: torch.device) -> M:
        """Build the per-step metadata that `write_kv` and `attend` need."""

    @abstractmethod
    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: M, scale: float) -> Tensor:
        """q: [tokens, heads, head_dim] -> output of the same shape."""

    def write_kv(self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, meta: M) -> None:
        """Store k, v ([tokens, kv_heads, head_dim]) at the step's slots of one layer's
        K and V ([blocks, block_size, kv_heads, head_dim]). The torch path; every slot
        must be a real one (graph padding's negative slots need a graph-safe override)."""
        # (block, offset) indexing works for any block stride (the MoE arena's is not bs*H*D).
        bs = k_cache.shape[1]
        blocks, offsets = meta.slot_mapping // bs, meta.slot_mapping % bs
        k_cache[blocks, offsets] = k.to(k_cache.dtype)
        v_cache[blocks, offsets] = v.to(v_cache.dtype)

    def write_rope_kv(
        self, layer: AttentionLayer, qkv: Tensor, inputs: AttentionInputs, meta: M
    ) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE on the step's q and k, and its K/V stored in the layer's KV.

        Returns (q [tokens, heads, head_dim] rotated, K, V): the layer's KV that `attend`
        reads. This default is the torch path: RoPE, then `write_kv` into the raw pool;
        a backend with a fused kernel uses it when `layer.fused`."""
        q, k, v = inputs.rotated_qkv(qkv, layer.heads)
        k_cache, v_cache = inputs.kv.k[layer.layer_index], inputs.kv.v[layer.layer_index]
        self.write_kv(k_cache, v_cache, k, v, meta)
        return q, k_cache, v_cache

    def lookahead(
        self, meta: Any, positions: Tensor, rope: Rotary, query_of: QueryOf
    ) -> Lookahead | None:
        """For this forward (its step's `meta`): what the model calls before each layer
        i < last with layer i+1 and layer i's input, so the backend may start layer i+1's
        work early (from layer i+1's queries of that input, `query_of`, rotated by `rope` at
        `positions`); None, the default: nothing to start."""
        return None

    def prepare_layers(
        self,
        geometries: Sequence[tuple[BatchLayout, Tensor]],
        layer_geometry: Sequence[int],
        device: torch.device,
    ) -> LayerwiseMetadata[M]:
        """Metadata for a step whose layers attend over different KV: `geometries` holds
        each distinct (layout, slot_mapping), with its own block tables and context
        lengths; layer i uses geometries[layer_geometry[i]]. Each is prepared once."""
        if not self.per_layer_metadata:
            raise ValueError(f"the {self.name} attention backend prepares one KV for all layers")
        built = [self.prepare(layout, slots, device) for layout, slots in geometries]
        return LayerwiseMetadata([built[g] for g in layer_geometry])

    # ---- CUDA graph capture (graph_safe backends) ---------------------------------------

    def graph_metadata(self, slot_mapping: Tensor, block_size: int, max_seq_len: int) -> M:
        """Static metadata for capturing decode steps of up to len(slot_mapping) rows
        (rows i of the flat batch, every one padding until filled). The caller owns
        `slot_mapping` ([rows] int64, negative = no write) and rewrites it before each
        replay; `max_seq_len` bounds every replay's sequence lengths."""
        raise NotImplementedError(f"the {self.name} attention backend is not graph-safe")

    def graph_rows(self, static: M, num_rows: int) -> M:
        """The first `num_rows` rows of `static`: what a graph of that size captures."""
        raise NotImplementedError(f"the {self.name} attention backend is not graph-safe")

    def fill_graph_metadata(self, static: M, seq_lens: Tensor, block_tables: Tensor) -> None:
        """Before a replay of `static` (from `graph_rows`): row i attends over seq_lens[i]
        tokens (0: padding, output zeros) of the blocks block_tables[i] (int32 device
        tensors; block_tables may have fewer rows and columns). No host sync."""
        raise NotImplementedError(f"the {self.name} attention backend is not graph-safe")


# Imported on demand: CPU installs without triton still get the reference backend.
BACKENDS: Registry[type[AttentionBackend[Any]]] = Registry("attention backend", {
    "reference": "strata.attention.reference:ReferenceAttention",
    "triton": "strata.attention.triton_backend:TritonAttention",
})  # fmt: skip


def get_backend(name: str) -> AttentionBackend[Any]:
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
