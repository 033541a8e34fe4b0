"""What the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the `n` most likely tokens' at one step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass
class RequestOutput:
    """A request's output so far; `finished` once it has stopped.

    text and token_ids are cumulative; delta_text and delta_token_ids hold what the
    last engine step added (for streaming). finish_reason: "stop" (EOS, stop token or
    stop string), "length" (max_tokens or context), "abort", or "error" (the engine
    failed a step this request was in; `error` says why). prompt_logprobs, when asked
    for, is there from the first output on.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # [i] scores prompt token i + 1
    num_cached_tokens: int = 0
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None


def coalesce(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output for two consecutive outputs of a request: the later one's state (text,
    token_ids and logprobs are cumulative) with both deltas."""
    return replace(
        later,
        delta_text=earlier.delta_text + later.delta_text,
        delta_token_ids=earlier.delta_token_ids + later.delta_token_ids,
    )
