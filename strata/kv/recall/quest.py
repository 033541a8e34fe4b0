"""Quest (Tang et al., ICML'24): per block and head, the element-wise min and max of the
post-RoPE keys; a query's score for a block is the upper bound of q.k over the block,

    score(q, block) = sum_i max(q_i * max_i, q_i * min_i)
                    = relu(q) . max + min(q, 0) . min       (two matmuls)

A GQA group shares one selection: each query head's bounds become a softmax over the
blocks (at the attention scale), and a block scores its largest share in the group, so
a block one head needs is not outvoted by heads whose logits run larger.
"""

from __future__ import annotations

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.policy import RecallPolicy, SummaryRoom, dead_blocks


class QuestPolicy(RecallPolicy):
    name = "quest"

    def __init__(self) -> None:
        self.kmin: torch.Tensor | None = None  # [layers, kv_heads, max_blocks, head_dim]
        self.kmax: torch.Tensor | None = None

    def allocate(self, room: SummaryRoom, rope: Rotary | None = None) -> None:
        shape = (room.layers, room.kv_heads, room.max_blocks, room.head_dim)
        # device None: torch's default, the CPU
        self.kmin = torch.zeros(shape, dtype=room.dtype, device=room.device)
        self.kmax = torch.zeros(shape, dtype=room.dtype, device=room.device)

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        return room.nbytes(per_block_vectors=2)  # min and max

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        assert self.kmin is not None and self.kmax is not None
        n = keys.shape[1]
        self.kmin[layer, :, first : first + n] = keys.amin(dim=2)
        self.kmax[layer, :, first : first + n] = keys.amax(dim=2)

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert self.kmin is not None and self.kmax is not None
        kmin = self.kmin[layer, :, :num_blocks]  # [kv_heads, n, head_dim]
        kmax = self.kmax[layer, :, :num_blocks]
        qs = q.to(kmin.dtype)  # matmuls in the summaries' dtype: no copy of them per step
        pos = qs.clamp(min=0)
        upper = torch.baddbmm(pos @ kmax.transpose(1, 2), qs - pos, kmin.transpose(1, 2))
        logits = upper.float() * kmin.shape[-1] ** -0.5  # [kv_heads, group, n]
        if live is None:
            return logits.softmax(dim=-1).amax(dim=1)
        dead = dead_blocks(num_blocks, live)
        shares = logits.masked_fill(dead, float("-inf")).softmax(dim=-1).amax(dim=1)
        return shares.masked_fill(dead, float("-inf"))
