"""Per-step work counts, recorded by the runner when asked (roofline accounting)."""

from __future__ import annotations

from dataclasses import dataclass

from strata.engine.plan import StepPlan


@dataclass(frozen=True)
class StepStats:
    tokens: int  # query tokens computed
    sampled: int  # rows through the LM head
    kv_tokens_read: int  # sum over sequences of context length (each KV read once)
    attended_pairs: int  # sum over query tokens of keys attended (causal)
    graph: bool  # replayed from a CUDA graph

    @classmethod
    def of(cls, plan: StepPlan, graph: bool) -> StepStats:
        pairs = 0
        for c in plan.chunks:  # keys start+1 .. end for the chunk's query tokens
            pairs += (c.start + 1 + c.end) * c.num_tokens // 2
        return cls(
            tokens=plan.num_tokens,
            sampled=sum(1 for c in plan.chunks if c.samples),
            kv_tokens_read=sum(c.end for c in plan.chunks),
            attended_pairs=pairs,
            graph=graph,
        )
