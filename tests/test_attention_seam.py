"""The attention seam on CPU: the base class's torch RoPE+KV write, per-layer metadata,
capability flags, and lossy codecs as a backend wrapped around another."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from strata.attention.backend import AttentionBackend, BatchLayout, get_backend
from strata.attention.layer_inputs import AttentionInputs, HeadLayout
from strata.attention.reference import ReferenceAttention
from strata.config import ModelConfig
from strata.kv.cache import KVCache
from strata.kv.codec import get_codec
from strata.kv.coded_attention import CodedAttention, attention_over
from strata.models.rope import RotaryEmbedding

HF = LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
CFG = ModelConfig.from_hf(HF)
HEADS = HeadLayout(CFG.num_heads, CFG.num_kv_heads, CFG.head_dim)


class _Layer:
    def __init__(self, index: int) -> None:
        self.layer_index = index
        self.heads = HEADS
        self.fused = True


def _cache(codec: str = "auto") -> KVCache:
    return KVCache(CFG, 8, 4, torch.float32, torch.device("cpu"), get_codec(codec), 2)


def test_default_write_rope_kv_is_rope_then_write_kv() -> None:
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(HF, CFG.head_dim, 64)
    layout = BatchLayout([3, 1], [3, 6], [[5], [2, 7]], 4)
    slots = torch.tensor([20, 21, 22, 29])
    positions = torch.tensor([0, 1, 2, 5])
    qkv = torch.randn(4, (4 + 2 * 2) * CFG.head_dim, generator=gen)
    backend = ReferenceAttention()
    meta = backend.prepare(layout, slots, torch.device("cpu"))
    cache = _cache()
    q, k_read, v_read = backend.write_rope_kv(
        _Layer(1), qkv, AttentionInputs(positions, rope, cache), meta
    )

    want_q, k, v = HEADS.split(qkv)
    want_q, k = rope(positions, want_q, k)
    want_k, want_v = torch.zeros_like(cache.k[1]), torch.zeros_like(cache.v[1])
    backend.write_kv(want_k, want_v, k, v, meta)
    assert torch.equal(q, want_q)
    assert k_read.data_ptr() == cache.k[1].data_ptr() and torch.equal(k_read, want_k)
    assert torch.equal(v_read, want_v) and not cache.k[0].any()


def test_prepare_layers_prepares_each_geometry_once() -> None:
    backend = ReferenceAttention()
    full = (BatchLayout([1], [6], [[2, 7]], 4), torch.tensor([29]))
    shorter = (BatchLayout([1], [4], [[2, 7]], 4), torch.tensor([11]))
    meta = backend.prepare_layers([full, shorter], [0, 1, 0], torch.device("cpu"))
    assert meta.for_layer(0) is meta.for_layer(2) is not meta.for_layer(1)
    assert meta.for_layer(1).slot_mapping.tolist() == [11]


def test_capabilities() -> None:
    assert not ReferenceAttention.graph_safe
    with pytest.raises(NotImplementedError, match="not graph-safe"):
        ReferenceAttention().graph_metadata(torch.zeros(2, dtype=torch.long), 4, 16)


def test_a_lossy_codec_wraps_the_backend() -> None:
    backend: AttentionBackend = get_backend("reference")
    assert attention_over(_cache(), backend) is backend
    coded = attention_over(_cache("int4"), backend)
    assert isinstance(coded, CodedAttention) and coded.inner is backend
    assert coded.name == "reference+int4" and not coded.graph_safe
    with pytest.raises(ValueError, match="one KV for all layers"):
        coded.prepare_layers([], [], torch.device("cpu"))
