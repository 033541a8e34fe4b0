"""A request as the scheduler sees it: tokens, how many are computed, and its state.

    token_ids  | prompt ............ | output ...... |
    computed   |<-- num_computed -->|                 KV exists for these tokens
    pending    |                    |<- to compute ->|   num_tokens - num_computed

A sequence runs until num_computed == num_tokens; the step that gets there samples one
more token. Prefill, chunked prefill, decode and recompute after preemption all follow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strata.engine.detokenizer import Detokenizer
from strata.engine.logit_rules import LogitRules
from strata.engine.outputs import TokenLogprobs
from strata.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

    from strata.kv.policies.runtime.sequence_kv import SequenceKV
    from strata.kv.recall.manager import RecallKV


# Under overlap scheduling (overlap.py), the placeholder of a token sampled on the device
# that the host has not seen yet: a sequence's last token at most, never a vocabulary id.
PENDING = -2


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # sampling noise is a function of (seed, output index): batch-independent
    max_tokens: int  # resolved against the context length
    detokenizer: Detokenizer | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 before
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # [i] scores token i+1
    kv: SequenceKV | None = None  # its KV policy's state; None under "full" (lossless)
    recall: RecallKV | None = None  # under a recall policy: its store state (kv is None)
    logit_rules: LogitRules | None = None  # penalties, biases and bans; None: none
    # The grammar's state after the output tokens (they never change, so recomputing the
    # KV after a preemption leaves it exact); None: unconstrained.
    grammar: xgrammar.GrammarMatcher | None = None
    grammar_accepted: int = 0  # output tokens the matcher has accepted (grammar_mask.py)
    sampling_checked: bool = False  # its sampling values fit the batch (runner.py)
    final_only: bool = False  # only its finished output is wanted (offline generate)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def cache_salt(self) -> str | None:
        """Its prefix-cache partition: only sequences of the same salt share blocks."""
        return self.params.cache_salt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_slots(self) -> int:
        """KV slots the sequence holds (its longest layer): num_computed unless evicting."""
        if self.recall is not None:
            return 0  # its KV lives in the recall store, not in pool blocks
        return self.num_computed if self.kv is None else self.kv.max_slots

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_known_output_tokens(self) -> int:
        """Output tokens the host has seen (a last PENDING one not counted)."""
        return self.num_output_tokens - (self.token_ids[-1] == PENDING)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
