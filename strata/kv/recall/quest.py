"""Quest (Tang et al., ICML'24): per block and head, the element-wise min and max of the
post-RoPE keys; a query's score for a block is the upper bound of q.k over the block,

    score(q, block) = sum_i max(q_i * max_i, q_i * min_i)
                    = relu(q) . max + min(q, 0) . min       (two matmuls)

With pages smaller than a block (room.quest_page_tokens), min and max are kept per page
and a block's bound is the largest of its pages' bounds: tighter, for twice the
summaries' memory each time the page halves.

A GQA group shares one selection: each query head's bounds become a softmax over the
blocks (at the attention scale), and a block scores its largest share in the group, so
a block one head needs is not outvoted by heads whose logits run larger.
"""

from __future__ import annotations

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.policy import RecallPolicy, SummaryRoom, block_probabilities


def pages_per_block(room: SummaryRoom) -> int:
    """Min/max pages per block (both powers of two: a page covers at most one block)."""
    return max(1, room.block_size // room.quest_page_tokens) if room.quest_page_tokens else 1


class QuestPolicy(RecallPolicy):
    name = "quest"

    def __init__(self) -> None:
        self.kmin: torch.Tensor | None = None  # [layers, kv_heads, max_blocks * pages, dim]
        self.kmax: torch.Tensor | None = None
        self.pages = 1  # per block

    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        buffers = buffers or OwnBuffers(room.device)
        self.pages = pages_per_block(room)
        shape = (room.layers, room.kv_heads, room.max_blocks * self.pages, room.head_dim)
        self.kmin = buffers.tensor("quest.kmin", shape, room.dtype, layered=True)
        self.kmax = buffers.tensor("quest.kmax", shape, room.dtype, layered=True)

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        return room.nbytes(per_block_vectors=2 * pages_per_block(room))  # min and max

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        self.summarize_layers(slice(layer, layer + 1), first, keys[None])

    def summarize_layers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        assert self.kmin is not None and self.kmax is not None
        num_layers, kvh, n, bs, d = keys.shape
        pages = keys.reshape(num_layers, kvh, n * self.pages, bs // self.pages, d)
        span = slice(first * self.pages, (first + n) * self.pages)
        self.kmin[layers][..., span, :] = pages.amin(dim=3)
        self.kmax[layers][..., span, :] = pages.amax(dim=3)

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert self.kmin is not None and self.kmax is not None
        span = slice(0, num_blocks * self.pages)
        kmin = self.kmin[layer][..., span, :]  # [..., kv_heads, n * pages, dim]
        kmax = self.kmax[layer][..., span, :]
        qs = q.to(kmin.dtype)  # matmuls in the summaries' dtype: no copy of them per step
        pos = qs.clamp(min=0)
        lanes = lambda x: x.flatten(0, -3)  # noqa: E731  [lanes = ... x kv_heads, *, dim]
        upper = torch.baddbmm(
            lanes(pos) @ lanes(kmax).transpose(1, 2), lanes(qs - pos), lanes(kmin).transpose(1, 2)
        ).view(*q.shape[:-1], kmin.shape[-2])
        if self.pages > 1:  # a block's bound: its best page's
            upper = upper.view(*upper.shape[:-1], num_blocks, self.pages).amax(dim=-1)
        # upper: [..., kv_heads, group, n], one bound a block
        return block_probabilities(upper, live, kmin.shape[-1] ** -0.5, 1, self.scores_kernel)
