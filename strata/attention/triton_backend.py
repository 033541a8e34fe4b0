"""The Triton attention backend (GPU; CPU only under TRITON_INTERPRET=1).

    prepare   host lists -> TritonMetadata (triton_meta.py), one host-to-device copy
    write_kv  one launch storing K and V at slot_mapping (triton_kv_write.py)
    attend    decode rows (query_len == 1): split-K kernel + merge (triton_decode.py)
              prefill rows (query_len > 1): varlen causal kernel (triton_prefill.py)

`write_kv` and `attend` never sync with the host: grids come from host ints stored in
the metadata. Capturing decode in a CUDA graph: build a static `TritonMetadata` with
`slot_mapping` [n] int64 (padding rows -1), `decode=DecodeMetadata.allocate(n, width,
max_model_len, device)`, `prefill=None`; before each replay copy the step's slots into
it and call `decode.fill_(live.decode)`. See triton_meta.py.
"""

from __future__ import annotations

import torch

from strata.attention.backend import AttentionBackend, BatchLayout
from strata.attention.triton_decode import decode_attention
from strata.attention.triton_kv_write import write_kv
from strata.attention.triton_meta import TritonMetadata, build_metadata
from strata.attention.triton_prefill import prefill_attention


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"triton attention needs a power-of-two head_dim in 16..256: {head_dim}")


class TritonAttention(AttentionBackend):
    name = "triton"

    def __init__(self, num_splits: int | None = None) -> None:
        """num_splits: force the decode split count (tests); None picks it per launch."""
        self.num_splits = num_splits

    def prepare(
        self, layout: BatchLayout, slot_mapping: torch.Tensor, device: torch.device
    ) -> TritonMetadata:
        return build_metadata(layout, slot_mapping, device)

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: TritonMetadata,
    ) -> None:
        write_kv(k_cache, v_cache, _last_dim_contiguous(k), _last_dim_contiguous(v),
                 meta.slot_mapping)  # fmt: skip

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: TritonMetadata,
        scale: float,
    ) -> torch.Tensor:
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


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
