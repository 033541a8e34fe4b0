"""KVzip (Kim et al., 2025): query-agnostic scores from reconstructing the context.

At the compression point the model is asked to repeat the context. That prompt runs as
extra prefill passes on top of the context's KV (runtime/reconstruction.py):

    slots   | context [0, C) | pass p: instruction + chat suffix + context[a, b) |
                              ^ slot C: each pass starts here and overwrites the last

A context token's score is the highest attention any query of the pass that repeats it
gives it, over those queries and the query heads of each KV head. Each KV head keeps the
sinks and its best-scored tokens; compresses once. Because no question is involved, the
compressed KV serves any later question (the query-agnostic protocol,
`kv_compress_prefix`).

Passes follow kvpress's KVzipPress: the context in pieces of CHUNK tokens, the first
asked with "Repeat the previous context exactly.", later ones with "Repeat the part of
the previous context exactly, starting with" and the previous piece's last OVERLAP
tokens. Differences: every query's softmax spans the whole context and the pass so far
(kvpress keeps only the sinks, the piece and the pass), the chat template's prefix is
scored like the rest of the context, and every head of a layer keeps the same number of
tokens (kvpress spreads one threshold over layers and heads).

Cost: the passes add a prefill of about C tokens (+ ~12 per piece), each query attending
over the whole context: 3x (one piece of C) to 2x (pieces much shorter than C) the
prefill's attention work, as much again for the scores (LayerObservation, in torch), and
1x its MLP work; plus the pass's KV (up to CHUNK + 32 tokens) on top of the context until
compaction frees it.
A model without a tokenizer gets passes of the bare context tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from strata.kv.policies.base import KVView
from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.rank_share import RankShare
from strata.kv.policies.scored import ScoredPolicy

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def chat_suffix(tokenizer: Any) -> str:
    """The text a chat template puts between a user turn's content and the answer."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return "\n"
    marker = "\n#############"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "dummy context" + marker}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return str(text).split(marker, 1)[1]


class KVzipPolicy(ScoredPolicy):
    name = "kvzip"
    NUM_SINKS = 4
    CHUNK = 2048
    OVERLAP = 8

    def reset(self) -> None:
        super().reset()
        self.pieces: list[tuple[int, int]] = []  # context range each pass repeats
        self.pass_of_layer = [-1] * self.shape.num_layers
        self.context_len = 0

    # ---- the reconstruction passes ---------------------------------------------------------

    def reconstruction_passes(self, context_ids: list[int]) -> list[list[int]]:
        """Token ids of each pass, run in order after the context (see module docstring)."""
        self.context_len = len(context_ids)
        self.pieces = [
            (a, min(a + self.CHUNK, len(context_ids)))
            for a in range(0, len(context_ids), self.CHUNK)
        ]
        self.pass_of_layer = [-1] * self.shape.num_layers
        first, later = self._encode(FIRST_PROMPT), self._encode(LATER_PROMPT)
        suffix = self._encode(self._suffix())
        passes = []
        for i, (a, b) in enumerate(self.pieces):
            ask = first if i == 0 else later + context_ids[max(0, a - self.OVERLAP) : a]
            passes.append(ask + suffix + context_ids[a:b])
        return passes

    @property
    def tokenizer(self) -> Any | None:
        return None if self.model is None else self.model.tokenizer

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None or not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _suffix(self) -> str:
        return "" if self.tokenizer is None else chat_suffix(self.tokenizer)

    # ---- scores -----------------------------------------------------------------------------

    def first_observed_token(self, context_len: int) -> int:
        return context_len  # only the passes' queries are observed: the context may hit

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        # Pass tokens sit at slots >= C before compression; nothing is observed after it.
        if not self.pieces or start < view.context_len:
            return None
        return (start, end)

    def observe(self, obs: LayerObservation) -> None:
        layer, c = obs.layer, self.context_len
        if int(obs.query_slots[0]) == c:  # a pass starts at slot C
            self.pass_of_layer[layer] += 1
        a, b = self.pieces[self.pass_of_layer[layer]]
        best = obs.max_attention()[:, a:b]
        scores = self.scores.get(layer, c, self.shape.num_kv_heads, best.device)
        scores[:, a:b] = torch.maximum(scores[:, a:b], best)
        self.scores.set(layer, scores)

    def rank_share(self, view: KVView, start: int, end: int) -> RankShare:
        return RankShare.MAXED

    def ranking(self, view: KVView, layer: int, k: int) -> torch.Tensor:
        scores = self.layer_scores(view, layer)
        scores[:, : self.NUM_SINKS] = torch.inf
        return scores

    def select(self, view: KVView, keep: list[int]) -> list[torch.Tensor]:
        masks = super().select(view, keep)
        self.pieces = []  # done: later tokens are not observed
        return masks
