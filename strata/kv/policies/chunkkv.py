"""ChunkKV (Liu et al., 2025): SnapKV's votes, kept in whole chunks of CHUNK tokens.

Evicting single tokens keeps fragments: a 7-digit number may keep 4 of its digits in a
layer and a different 4 in the next. ChunkKV keeps contiguous chunks instead. The votes
are SnapKV's (the observation window's attention, summed over its queries), summed here
over every query head of the layer, so all KV heads of a layer keep the same chunks.
A chunk's score is the sum of its tokens' votes; chunks are aligned to slot 0, which at
the compression point is token 0, so a chunk is one KV block when CHUNK == block size.

Each layer keeps the observation window, then whole chunks in order of score; the last
chunk that does not fit keeps its best-voted tokens.

The window is 16 tokens, not SnapKV's 64: in a served prompt the last tokens are the
chat template's tail and the start of the answer, whose queries point at what the answer
needs, and a short window leaves more of the budget to chunks. On RULER niah samples of
another seed than the evaluation's (2k tokens, 12.5%, SmolLM2-135M, query-aware) windows
of 16 and 32 scored 78 against 22 for 64 (docs/quality.md). Compresses once, at the compression
point; the cache grows while decoding.
"""

from __future__ import annotations

import torch

from strata.kv.policies.base import KVView
from strata.kv.policies.chunks import keep_chunks
from strata.kv.policies.snapkv import SnapKVPolicy


class ChunkKVPolicy(SnapKVPolicy):
    name = "chunkkv"
    CHUNK = 16
    WINDOW = 16

    def select_layer(self, view: KVView, layer: int, k: int) -> torch.Tensor:
        n = view.num_slots(layer)
        heads = self.shape.num_kv_heads
        votes = self.scores.get(layer, n, heads, view.device).sum(dim=0)  # every head
        return keep_chunks(votes, k, self.CHUNK, self.window(view.context_len), heads)
