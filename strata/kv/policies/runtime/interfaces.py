"""What the KV-policy runtime reads of the engine's requests and steps.

Structural types: the engine's Sequence, SamplingParams, ScheduledChunk and StepPlan
fit them, and the runtime never imports the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from strata.kv.policies.runtime.sequence_kv import SequenceKV
    from strata.kv.recall.manager import RecallKV


class PolicyParams(Protocol):
    """A request's KV-policy fields (SamplingParams)."""

    @property
    def kv_policy(self) -> str | None: ...

    @property
    def kv_budget(self) -> float | None: ...

    @property
    def kv_compress_prefix(self) -> int | None: ...


class PolicySequence(Protocol):
    """A request: its tokens, how many are computed, and its policy state (`kv`)."""

    request_id: str
    token_ids: list[int]
    num_computed: int
    kv: SequenceKV | None
    recall: RecallKV | None
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def cache_salt(self) -> str | None:
        """Its prefix-cache partition (a tenant, a cache_salt)."""
        ...

    @property
    def params(self) -> PolicyParams: ...


class PolicyChunk(Protocol):
    """Tokens [start, start + num_tokens) of `seq` computed in one step, in the blocks
    `block_table`."""

    @property
    def seq(self) -> PolicySequence: ...

    @property
    def start(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def block_table(self) -> list[int]: ...


class PolicyStep(Protocol):
    """One step's chunks, in batch order (StepPlan)."""

    @property
    def chunks(self) -> Sequence[PolicyChunk]: ...
