"""The modules a model built from `ShardLayout.local_config()` needs to be one rank of the
whole: vocabulary-parallel embedding and LM head, a q/k norm over sharded features, and an
all-reduce after every row-parallel output (o_proj, each MLP, each MoE block).

Parameter names do not change, so load_weights and the fingerprint see the usual names;
the shapes are the rank's share (strata/models/tp/weights.py slices checkpoints to them).
A row-parallel bias (OLMoE's o_proj) is held by rank 0 only; other ranks hold zeros, so
it is added once by the all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from strata.models.llama import RMSNorm
from strata.models.tp.comm import Communicator
from strata.models.tp.layout import ShardLayout


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + vocab_rows) of the embedding; ids elsewhere give
    zeros here and their row on the rank that holds it: the all-reduce sums one row."""

    def __init__(self, layout: ShardLayout, comm: Communicator) -> None:
        super().__init__(layout.vocab_rows, layout.full.hidden_size)
        self.comm = comm
        self.vocab_start = layout.vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce(out)


class VocabParallelHead(nn.Linear):
    """This rank's vocabulary rows of the LM head; rank 0 gets every rank's logits (the
    padding rows past the vocabulary cut off), other ranks their own share."""

    def __init__(self, layout: ShardLayout, comm: Communicator) -> None:
        super().__init__(layout.full.hidden_size, layout.vocab_rows, bias=False)
        self.comm = comm
        self.vocab_size = layout.full.vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.comm.gather_last_dim(F.linear(x, self.weight))
        return logits[..., : self.vocab_size]


class ShardedRMSNorm(RMSNorm):
    """RMSNorm over features split across ranks (OLMoE's q/k norms over the whole
    projection): the sum of squares is all-reduced. Replicated KV heads count on each of
    their ranks in both the sum and the feature count, so the mean is unchanged."""

    def __init__(self, size: int, eps: float, comm: Communicator) -> None:
        super().__init__(size, eps)
        self.comm = comm
        self.total_features = size * comm.size

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            raise ValueError("ShardedRMSNorm normalises q/k only: no residual")
        xf = x.float()
        squares = self.comm.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        xf = xf * torch.rsqrt(squares / self.total_features + self.eps)
        return self.weight * xf.to(x.dtype), x


def _all_reduce_output(comm: Communicator) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(output)

    return hook


def shard_modules(model: nn.Module, layout: ShardLayout, comm: Communicator) -> None:
    """Make `model` (a LlamaModel or MoeModel of the layout's local config, on the meta
    device) one rank of the whole; call before its weights are allocated."""
    cfg = layout.full
    model.embed_tokens = VocabParallelEmbedding(layout, comm)
    model.lm_head = VocabParallelHead(layout, comm)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    reduce = _all_reduce_output(comm)
    for layer in model.layers:  # type: ignore[union-attr]
        attn = layer.self_attn
        attn.o_proj.register_forward_hook(reduce)
        layer.mlp.register_forward_hook(reduce)  # a dense MLP or a whole MoE block
        if attn.qk_norm == "full":
            attn.q_norm = ShardedRMSNorm(attn.q_size, cfg.rms_norm_eps, comm)
            attn.k_norm = ShardedRMSNorm(attn.kv_size, cfg.rms_norm_eps, comm)
