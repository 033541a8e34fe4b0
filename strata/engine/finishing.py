"""What a step's sampled tokens mean for their sequences: stop reasons, logprobs, and the
RequestOutput a front end sees."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from strata.engine.detokenizer import decode_ids
from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.engine.sampler import SamplerOutput
from strata.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger("strata.engine")


def stop_reason(seq: Sequence, eos_token_ids: Collection[int]) -> str | None:
    """"stop" or "length" once the sequence's last token ends it; None while it goes on.
    Feeds the token to the detokenizer, which watches for stop strings. A sequence with
    max_tokens 0 only scores its prompt: the token its last prompt position sampled is
    dropped."""
    if seq.max_tokens == 0:
        seq.token_ids.pop()
        seq.logprobs.clear()
        return "length"
    token = seq.token_ids[-1]
    params = seq.params
    if token < 0:
        return _nothing_allowed(seq)
    if seq.grammar is not None and token in eos_token_ids:
        return "stop"  # the grammar's mask allows its stop tokens only where it may end
    if seq.detokenizer is not None and seq.detokenizer.add(token):
        return "stop"
    if not params.ignore_eos and token in eos_token_ids:
        return "stop"
    if token in params.stop_token_ids:
        return "stop"
    if seq.num_output_tokens >= seq.max_tokens:
        return "length"
    return None


def _nothing_allowed(seq: Sequence) -> str:
    """The sampler found no allowed token (it returns -1): bans (min_tokens, bad_words)
    left a grammar none. The output ends before that token, which is dropped."""
    logger.warning("%s: no token is allowed (grammar and bans); the output ends", seq.request_id)
    seq.token_ids.pop()
    if len(seq.logprobs) > seq.num_output_tokens:
        seq.logprobs.pop()
    return "stop"


def record_logprobs(
    seqs: list[Sequence], sampled: SamplerOutput, rows: list[int] | None = None
) -> None:
    """Append row rows[i]'s (default i's) chosen and top-N log-probabilities to seqs[i]
    (if it asked)."""
    assert sampled.logprobs is not None and sampled.top_ids is not None
    assert sampled.top_logprobs is not None
    chosen = sampled.logprobs.tolist()
    top_ids = sampled.top_ids.tolist()
    top_lp = sampled.top_logprobs.tolist()
    for i, seq in enumerate(seqs):
        row = i if rows is None else rows[i]
        n = seq.params.logprobs
        if n is None:
            continue
        top = tuple(zip(top_ids[row][:n], top_lp[row][:n], strict=True))
        seq.logprobs.append(TokenLogprobs(seq.token_ids[-1], chosen[row], top))


def request_output(seq: Sequence, tokenizer: Any | None, delta_tokens: int = 0) -> RequestOutput:
    """The sequence as a front end sees it; `delta_tokens` new since the last output."""
    finished = seq.status is SequenceStatus.FINISHED
    output_ids = seq.output_token_ids
    if seq.detokenizer is not None:
        text = seq.detokenizer.text
        delta = seq.detokenizer.take_delta(finished)
    else:
        decoded = tokenizer is not None and finished
        text = decode_ids(tokenizer, output_ids, seq.params.skip_special_tokens) if decoded else ""
        delta = ""
    return RequestOutput(
        request_id=seq.request_id,
        prompt=seq.prompt,
        prompt_token_ids=seq.prompt_token_ids,
        text=text,
        token_ids=output_ids,
        finished=finished,
        finish_reason=seq.finish_reason,
        logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        # Complete before the first output token, and never changed after: shared, not copied.
        prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
        num_cached_tokens=max(seq.num_cached_tokens, 0),
        delta_text=delta,
        delta_token_ids=output_ids[len(output_ids) - delta_tokens :] if delta_tokens else [],
    )
