"""What crosses between the front end and the engine process, as msgpack.

Requests go front -> engine as their token ids and SamplingParams (the non-default
fields; a structured output as its (kind, spec, strict) spec: the engine compiles it).
Outputs go engine -> front in one message per step, each request's as what changed:

    item = [request_id, flags, finish_reason, error, delta_text, text_tail,
            tokens_kept, new_tokens, delta_token_ids, logprobs, prompt_logprobs,
            num_cached_tokens]

The front keeps each request's text and lists and rebuilds the RequestOutput the
engine made, equal field by field:
- text = every delta_text so far + text_tail (the engine's text always starts with the
  deltas it handed out; the tail is what it holds back, or all of it without deltas);
- token_ids = token_ids[:tokens_kept] + new_tokens (a list may lose its last entry
  when a token is dropped at the end, never more); logprobs likewise, as
  [kept, new entries] or None; prompt_logprobs is sent once, with the first output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from strata.engine.grammar_compiler import GrammarCompileError
from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.engine.sampling_params import SamplingParams
from strata.engine.structured_output import StructuredOutput
from strata.errors import ContextLengthError, InvalidRequestError

FINISHED, BARE = 1, 2  # item flags; BARE: an output made without its sequence (no prompt)
_TUPLE_FIELDS = frozenset({"stop", "stop_token_ids", "bad_words"})
_DEFAULTS = SamplingParams()
# The errors a request's check may raise, rebuilt with their type, message and param.
_ERRORS: dict[str, type[InvalidRequestError]] = {
    cls.__name__: cls for cls in (InvalidRequestError, ContextLengthError, GrammarCompileError)
}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if value == getattr(_DEFAULTS, f.name):
            continue
        if isinstance(value, StructuredOutput):
            value = [value.kind, value.spec, value.strict]
        out[f.name] = value
    return out


def params_from_wire(fields: dict[str, Any]) -> SamplingParams:
    for name in _TUPLE_FIELDS & fields.keys():
        fields[name] = tuple(fields[name])
    so = fields.get("structured_output")
    if so is not None:
        fields["structured_output"] = StructuredOutput(*so)
    return SamplingParams(**fields)


def failed_item(request_id: str, message: str, tokens_kept: int) -> list[Any]:
    """The item that finishes a request with reason "error", keeping what it received."""
    return [request_id, FINISHED, "error", message, "", "", tokens_kept, [], [], None, None, 0]


def error_to_wire(exc: BaseException) -> list[Any]:
    return [type(exc).__name__, str(exc), getattr(exc, "param", None)]


def error_from_wire(error: list[Any]) -> Exception:
    """The request's error as the engine raised it: an InvalidRequestError (or subclass)
    with its param; anything else as a RuntimeError naming its type."""
    name, message, param = error
    cls = _ERRORS.get(name)
    if cls is None:
        return RuntimeError(f"{name}: {message}")
    return cls(message, param)


@dataclass
class SentState:
    """Engine side: how much of one request's output the front end has."""

    chars: int = 0
    tokens: int = 0
    logprobs: int = 0
    prompt_logprobs: bool = False

    def encode(self, out: RequestOutput) -> list[Any]:
        flags = (FINISHED if out.finished else 0) | (0 if out.prompt_token_ids else BARE)
        self.chars += len(out.delta_text)
        kept = min(self.tokens, len(out.token_ids))
        self.tokens = len(out.token_ids)
        logprobs = None
        if out.logprobs is not None:
            lp_kept = min(self.logprobs, len(out.logprobs))
            logprobs = [lp_kept, [_lp_to_wire(e) for e in out.logprobs[lp_kept:]]]
            self.logprobs = len(out.logprobs)
        prompt_lp = None
        if out.prompt_logprobs is not None and not self.prompt_logprobs:
            prompt_lp = [_lp_to_wire(e) for e in out.prompt_logprobs]
            self.prompt_logprobs = True
        return [
            out.request_id, flags, out.finish_reason, out.error, out.delta_text,
            out.text[self.chars :], kept, out.token_ids[kept:], out.delta_token_ids,
            logprobs, prompt_lp, out.num_cached_tokens,
        ]  # fmt: skip


@dataclass
class ReceivedState:
    """Front side: one request's output as received so far."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""  # the deltas so far
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None

    def decode(self, item: list[Any]) -> RequestOutput:
        (request_id, flags, reason, error, delta, tail, kept, new_tokens, delta_ids,
         logprobs, prompt_lp, cached) = item  # fmt: skip
        self.text += delta
        del self.token_ids[kept:]
        self.token_ids += new_tokens
        out_logprobs = None
        if logprobs is not None:
            del self.logprobs[logprobs[0] :]
            self.logprobs += [_lp_from_wire(e) for e in logprobs[1]]
            out_logprobs = list(self.logprobs)
        if prompt_lp is not None:
            self.prompt_logprobs = [_lp_from_wire(e) for e in prompt_lp]
        bare = flags & BARE
        return RequestOutput(
            request_id=request_id,
            prompt=None if bare else self.prompt,
            prompt_token_ids=[] if bare else self.prompt_token_ids,
            text=self.text + tail,
            token_ids=list(self.token_ids),
            finished=bool(flags & FINISHED),
            finish_reason=reason,
            logprobs=out_logprobs,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=cached,
            delta_text=delta,
            delta_token_ids=delta_ids,
            error=error,
        )


def _lp_to_wire(entry: TokenLogprobs) -> list[Any]:
    return [entry.token_id, entry.logprob, entry.top]


def _lp_from_wire(entry: list[Any]) -> TokenLogprobs:
    token_id, logprob, top = entry
    return TokenLogprobs(token_id, logprob, tuple((t, lp) for t, lp in top))
