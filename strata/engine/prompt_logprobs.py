"""Prompt logprobs: each prompt token's log-probability given the tokens before it.

The logits at position p score token p + 1, so a sequence that asked for them needs the
logits of every prompt position but the last (whose logits sample the first output
token):

    prompt    | t0 | t1 | t2 | ... | tP-1 |
    logits at   0    1    2   ...   P-2     -> score t1 .. tP-1   (t0 has none)
                                    P-1     -> samples the first output token

`seq.prompt_logprobs[i]` scores token i + 1. Positions already scored are not scored
again when a preempted sequence is recomputed, and the prefix cache may serve only the
tokens before the first unscored position (scheduler.py), so the rest is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.engine.outputs import TokenLogprobs
from strata.engine.plan import StepPlan
from strata.engine.sequence import Sequence


def next_unscored(seq: Sequence) -> int | None:
    """The first prompt position whose logits the sequence still needs; None if none."""
    if seq.params.prompt_logprobs is None:
        return None
    position = len(seq.prompt_logprobs)
    return position if position < seq.num_prompt_tokens - 1 else None


@dataclass(frozen=True)
class PromptSpan:
    seq: Sequence
    start: int  # first position scored this step
    end: int


@dataclass(frozen=True)
class PromptRows:
    """The step's prompt positions to score, as rows of its flat token batch."""

    spans: tuple[PromptSpan, ...]
    rows: tuple[int, ...]  # flat batch row of each scored position, spans in order

    @staticmethod
    def of(plan: StepPlan) -> PromptRows | None:
        spans: list[PromptSpan] = []
        rows: list[int] = []
        offset = 0
        for chunk in plan.chunks:
            first = next_unscored(chunk.seq)
            if first is not None:
                start = max(chunk.start, first)
                end = min(chunk.end, chunk.seq.num_prompt_tokens - 1)
                if start < end:
                    spans.append(PromptSpan(chunk.seq, start, end))
                    rows.extend(range(offset + start - chunk.start, offset + end - chunk.start))
            offset += chunk.num_tokens
        return PromptRows(tuple(spans), tuple(rows)) if spans else None

    def record(self, logits: torch.Tensor) -> None:
        """Score the spans from their logits ([len(rows), vocab], in row order)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = [t for s in self.spans for t in s.seq.prompt_token_ids[s.start + 1 : s.end + 1]]
        index = torch.tensor(targets, device=logits.device)[:, None]
        chosen = logprobs.gather(1, index).squeeze(1).tolist()
        k = max(s.seq.params.prompt_logprobs or 0 for s in self.spans)
        top_lp, top_ids = logprobs.topk(max(k, 1), dim=-1)
        top_lps, top_idss = top_lp.tolist(), top_ids.tolist()
        row = 0
        for span in self.spans:
            assert span.start == len(span.seq.prompt_logprobs)  # scored in order, once
            n = span.seq.params.prompt_logprobs or 0
            for target in span.seq.prompt_token_ids[span.start + 1 : span.end + 1]:
                top = tuple(zip(top_idss[row][:n], top_lps[row][:n], strict=True))
                span.seq.prompt_logprobs.append(TokenLogprobs(target, chosen[row], top))
                row += 1
