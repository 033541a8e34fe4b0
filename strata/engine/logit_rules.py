"""LogitRules: one request's penalties, biases and bans, with its words resolved to ids.

Made once when the request is prepared (RequestFactory), so bad input fails before
anything is queued; read every step by logits_adjust.py, which applies the rules of a
whole batch at once on the device.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from strata.engine.sampling_params import SamplingParams
from strata.errors import InvalidRequestError


@dataclass(frozen=True)
class LogitRules:
    bias: tuple[tuple[int, float], ...]  # (token id, added to its logit)
    stop_ids: tuple[int, ...]  # banned while the output is shorter than min_tokens
    min_tokens: int
    bad_words: tuple[tuple[int, ...], ...]  # token ids of each banned word
    presence: float
    frequency: float
    repetition: float

    @property
    def penalized(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0

    def banned(self, output: list[int]) -> list[int]:
        """Tokens the next step may not sample, given the output so far."""
        banned = list(self.stop_ids) if len(output) < self.min_tokens else []
        for word in self.bad_words:
            head = list(word[:-1])  # must end the output for the last token to be banned
            if len(output) >= len(head) and output[len(output) - len(head) :] == head:
                banned.append(word[-1])
        return banned


def logit_rules(
    params: SamplingParams, tokenizer: Any | None, vocab_size: int, eos_ids: Collection[int]
) -> LogitRules | None:
    """The request's rules; None when it has none. Raises InvalidRequestError for a
    logit_bias id outside the vocabulary, or bad_words on a model without a tokenizer."""
    bias = tuple(sorted((params.logit_bias or {}).items()))
    outside = [t for t, _ in bias if t >= vocab_size]
    if outside:
        raise InvalidRequestError(
            f"logit_bias token ids must be in [0, {vocab_size}), got {outside[:5]}", "logit_bias"
        )
    stop_ids: set[int] = set()
    if params.min_tokens > 0:
        stop_ids = {*(() if params.ignore_eos else eos_ids), *params.stop_token_ids}
    rules = LogitRules(
        bias=bias,
        stop_ids=tuple(sorted(t for t in stop_ids if t < vocab_size)),
        min_tokens=params.min_tokens,
        bad_words=_bad_word_ids(params.bad_words, tokenizer),
        presence=float(params.presence_penalty),
        frequency=float(params.frequency_penalty),
        repetition=float(params.repetition_penalty),
    )
    if not (rules.bias or rules.stop_ids or rules.bad_words or rules.penalized):
        return None
    return rules


def _bad_word_ids(words: tuple[str, ...], tokenizer: Any | None) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids as it starts the text and after a space, without repeats."""
    if not words:
        return ()
    if tokenizer is None:
        raise InvalidRequestError("bad_words needs a model with a tokenizer", "bad_words")
    found: dict[tuple[int, ...], None] = {}
    for word in words:
        for prefix in ("", " "):
            ids = tuple(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if ids:
                found[ids] = None
    return tuple(found)
