"""ShadowPass: a KV policy's reconstruction pass run through the model runner.

The pass's chunk belongs to a shadow of the sequence (its context's ids, then the
pass's) that shares the sequence's KV state, so the runner maps its slots and observes
its queries as it would the sequence's own (strata/kv/policies/runtime/reconstruction.py).
"""

from __future__ import annotations

from strata.engine.plan import ScheduledChunk, StepPlan
from strata.engine.runner import ModelRunner
from strata.engine.sequence import Sequence
from strata.kv.policies.runtime.interfaces import PolicySequence
from strata.kv.policies.runtime.reconstruction import PassChunk


class ShadowPass:
    """The engine's `PassForward`."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def __call__(self, seq: PolicySequence, chunk: PassChunk) -> None:
        if not isinstance(seq, Sequence):
            raise TypeError(f"a reconstruction pass needs an engine Sequence, got {type(seq)}")
        shadow = Sequence(
            request_id=seq.request_id,
            prompt=None,
            prompt_token_ids=chunk.token_ids,
            params=seq.params,
            seed=seq.seed,
            max_tokens=1,
            kv=seq.kv,
        )
        scheduled = ScheduledChunk(shadow, chunk.start, chunk.num_tokens, chunk.block_table)
        self.runner.compute_logits(StepPlan((scheduled,)))
