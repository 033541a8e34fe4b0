"""StreamingLLM (Xiao et al., 2023): the first tokens (attention sinks) and a recent window.

Keeps, in every layer and head, the `NUM_SINKS` earliest positions and the most recent
`keep - NUM_SINKS`; while decoding it evicts the oldest non-sink token after each step.
Needs no attention scores.
"""

from __future__ import annotations

import torch

from strata.kv.policies.base import KVPolicy, KVView, keep_top


class StreamingPolicy(KVPolicy):
    name = "streaming"
    evicts_during_decode = True
    NUM_SINKS = 4

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        masks = []
        for layer, k in enumerate(keep):
            pos = view.positions(layer)
            # A sink outranks every recent token; among the rest the newest rank first.
            score = torch.where(pos < self.NUM_SINKS, pos.new_tensor(2**62), pos)
            masks.append(keep_top(score, k))
        return masks
