"""The Triton attention backend (GPU; CPU only under TRITON_INTERPRET=1).

    prepare        host lists -> TritonMetadata (triton_meta.py), one host-to-device copy
    write_rope_kv  on CUDA with fused ops: one launch rotating q and k and storing K and V
                   (strata/ops/rope_kv.py); else the torch RoPE, then `write_kv`
    write_kv       one launch storing K and V at slot_mapping (triton_kv_write.py)
    attend         decode rows (query_len == 1): split-K kernel + merge (triton_decode.py)
                   prefill rows (query_len > 1): varlen causal kernel (triton_prefill.py)

None of them syncs with the host: grids come from host ints stored in the metadata. So
decode steps may be captured in CUDA graphs (graph_safe); the capture hooks build and
fill static `TritonMetadata` as triton_meta.py describes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from strata.attention.backend import AttentionBackend, BatchLayout
from strata.attention.layer_inputs import AttentionInputs, AttentionLayer
from strata.attention.triton_decode import decode_attention
from strata.attention.triton_kv_write import write_kv
from strata.attention.triton_meta import DecodeMetadata, TritonMetadata, build_metadata
from strata.attention.triton_prefill import prefill_attention


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"triton attention needs a power-of-two head_dim in 16..256: {head_dim}")


class TritonAttention(AttentionBackend[TritonMetadata]):
    name = "triton"
    graph_safe = True

    def __init__(self, num_splits: int | None = None) -> None:
        """num_splits: force the decode split count (tests); None picks it per launch."""
        self.num_splits = num_splits

    def prepare(
        self, layout: BatchLayout, slot_mapping: Tensor, device: torch.device
    ) -> TritonMetadata:
        return build_metadata(layout, slot_mapping, device)

    def write_kv(
        self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, meta: TritonMetadata
    ) -> None:
        write_kv(k_cache, v_cache, _last_dim_contiguous(k), _last_dim_contiguous(v),
                 meta.slot_mapping)  # fmt: skip

    def write_rope_kv(
        self, layer: AttentionLayer, qkv: Tensor, inputs: AttentionInputs, meta: TritonMetadata
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not (layer.fused and qkv.is_cuda):
            return super().write_rope_kv(layer, qkv, inputs, meta)
        # Imported on this CUDA path only: CPU runs (tests interpreting the attention
        # kernels) never load it.
        from strata.ops.rope_kv import rope_write_kv

        i, rope, heads = layer.layer_index, inputs.rope, layer.heads
        k_cache, v_cache = inputs.kv.k[i], inputs.kv.v[i]
        q = rope_write_kv(qkv, inputs.positions, rope.cos, rope.sin, k_cache, v_cache,
                          meta.slot_mapping, heads.num_heads, heads.num_kv_heads)  # fmt: skip
        return q, k_cache, v_cache

    def attend(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: TritonMetadata, scale: float
    ) -> Tensor:
        _check_head_dim(q.shape[-1])
        if q.shape[1] % k_cache.shape[2]:
            raise ValueError("query heads must be a multiple of KV heads")
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must share a layout with contiguous head_dim")
        q = _last_dim_contiguous(q)
        out = torch.empty_like(q)
        if meta.decode is not None:
            decode_attention(q, k_cache, v_cache, out, meta.decode, meta.block_size, scale,
                             self.num_splits)  # fmt: skip
        if meta.prefill is not None:
            prefill_attention(q, k_cache, v_cache, out, meta.prefill, meta.block_size, scale)
        return out

    # ---- CUDA graph capture --------------------------------------------------------------

    def graph_metadata(
        self, slot_mapping: Tensor, block_size: int, max_seq_len: int
    ) -> TritonMetadata:
        width = -(-max_seq_len // block_size)
        rows = DecodeMetadata.allocate(len(slot_mapping), width, max_seq_len, slot_mapping.device)
        return TritonMetadata(slot_mapping, block_size, rows, None)

    def graph_rows(self, static: TritonMetadata, num_rows: int) -> TritonMetadata:
        assert static.decode is not None
        return TritonMetadata(
            static.slot_mapping[:num_rows], static.block_size, static.decode.rows(num_rows), None
        )

    def fill_graph_metadata(
        self, static: TritonMetadata, seq_lens: Tensor, block_tables: Tensor
    ) -> None:
        assert static.decode is not None
        static.decode.set_rows_(seq_lens, block_tables)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
