"""CodedAttention: a lossy KV codec as an attention backend wrapped around another one.

    prepare        plan_codec_step (codec_step.py) moves tail rows and remaps the block
                   tables into a scratch pool; the inner backend prepares over those
    write_rope_kv  RoPE (torch), then per layer:
                     tail rows + the step's K/V --> work blocks (full precision)
                     complete work blocks ------encode--> the pool;  open ones --> tail rows
                     the step's stored blocks --decode--> scratch, followed by open blocks
                   returns the scratch K/V
    attend         the inner backend over the scratch, as over any raw pool

So a token is read back as it is stored: decoded once its block is complete, exact while
its block is open. Tail rows move in `prepare`: a step is prepared once, for all layers
alike (no per-layer metadata), and its decode step plans reads on the host, so it is not
graph-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from strata.attention.backend import AttentionBackend, AttentionMetadata, BatchLayout
from strata.attention.layer_inputs import AttentionInputs, AttentionLayer
from strata.kv.cache import KVCache
from strata.kv.codec import BlockCodec
from strata.kv.codec_step import CodecStep, plan_codec_step
from strata.kv.codec_tail import TailStore


@dataclass(frozen=True)
class CodedMetadata(AttentionMetadata):
    slot_mapping: Tensor  # [tokens] the step's slots in the pool (block tables' ids)
    step: CodecStep  # where each token's K/V goes, which blocks attention reads
    inner: AttentionMetadata  # the inner backend's, over step.attention_layout (scratch)


class CodedAttention(AttentionBackend[CodedMetadata]):
    per_layer_metadata = False  # prepare moves tail rows: once per step

    def __init__(self, inner: AttentionBackend[Any], codec: BlockCodec, tails: TailStore) -> None:
        self.inner = inner
        self.codec = codec
        self.tails = tails
        self.name = f"{inner.name}+{codec.name}"

    def prepare(
        self, layout: BatchLayout, slot_mapping: Tensor, device: torch.device
    ) -> CodedMetadata:
        step = plan_codec_step(layout, self.tails, device)
        inner = self.inner.prepare(step.attention_layout, slot_mapping, device)
        return CodedMetadata(slot_mapping, step, inner)

    def write_rope_kv(
        self, layer: AttentionLayer, qkv: Tensor, inputs: AttentionInputs, meta: CodedMetadata
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = inputs.rotated_qkv(qkv, layer.heads)
        i = layer.layer_index
        k_read, v_read = self._write_and_gather([part[i] for part in inputs.kv.parts], i, k, v,
                                                meta.step)  # fmt: skip
        return q, k_read, v_read

    def attend(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: CodedMetadata, scale: float
    ) -> Tensor:
        return self.inner.attend(q, k_cache, v_cache, meta.inner, scale)

    def _write_and_gather(
        self, pools: Sequence[Tensor], layer: int, k: Tensor, v: Tensor, step: CodecStep
    ) -> tuple[Tensor, Tensor]:
        """Store the step's k, v ([tokens, kv_heads, head_dim]) of one layer (`pools`: its
        coded parts); return the scratch K and V ([blocks, block_size, kv_heads, head_dim])
        attention reads: the stored blocks decoded, then the open ones."""
        tails = self.tails
        bs, heads, dim = tails.k.shape[2:]
        dtype = tails.k.dtype
        work = []
        for x, rows in ((k, tails.k[layer]), (v, tails.v[layer])):
            w = torch.zeros((step.num_work, bs, heads, dim), dtype=dtype, device=x.device)
            if step.prior_work.numel():
                w[step.prior_work] = rows[step.prior_rows]
            w.view(-1, heads, dim).index_copy_(0, step.token_work, x.to(dtype))
            work.append(w)
        work_k, work_v = work
        if step.done_work.numel():
            parts = self.codec.encode(work_k[step.done_work], work_v[step.done_work])
            for pool, part in zip(pools, parts, strict=True):
                pool.index_copy_(0, step.done_blocks, part)
        if step.open_work.numel():
            tails.k[layer].index_copy_(0, step.open_rows, work_k[step.open_work])
            tails.v[layer].index_copy_(0, step.open_rows, work_v[step.open_work])
        coded = [pool.index_select(0, step.stored_blocks) for pool in pools]
        stored_k, stored_v = self.codec.decode(coded, dtype)
        return (
            torch.cat([stored_k, work_k[step.open_work]]),
            torch.cat([stored_v, work_v[step.open_work]]),
        )


def attention_over(cache: KVCache, backend: AttentionBackend[Any]) -> AttentionBackend[Any]:
    """The backend the model attends over `cache` with: `backend` itself over a raw pool;
    under a lossy codec, CodedAttention around it."""
    if cache.tails is None:
        return backend
    return CodedAttention(backend, cache.codec, cache.tails)
