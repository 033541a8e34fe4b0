"""The engine process's wire format (engine/core/wire.py): what the front end rebuilds
equals, field by field, what the engine made."""

from __future__ import annotations

from dataclasses import replace

import pytest

from strata.engine.core.wire import (
    ReceivedState,
    SentState,
    error_from_wire,
    error_to_wire,
    pack,
    params_from_wire,
    params_to_wire,
    unpack,
)
from strata.engine.grammar_compiler import GrammarCompileError
from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.engine.sampling_params import SamplingParams
from strata.engine.structured_output import StructuredOutput
from strata.errors import ContextLengthError, InvalidRequestError

PROMPT = [5, 6, 7]


def lp(token: int) -> TokenLogprobs:
    return TokenLogprobs(token, -0.5 * token, ((token, -0.5 * token), (1, -3.25)))


def outputs() -> list[RequestOutput]:
    """A stream as the engine makes it: text held back for a stop string (text longer
    than the deltas), a last token dropped at the end (token_ids and logprobs shrink)."""
    base = RequestOutput("r", "hi", PROMPT, prompt_logprobs=[lp(6), lp(7)])
    return [
        replace(base, text="ab", token_ids=[10], logprobs=[lp(10)], delta_text="a",
                delta_token_ids=[10]),
        replace(base, text="abcd", token_ids=[10, 11], logprobs=[lp(10), lp(11)],
                delta_text="bc", delta_token_ids=[11], num_cached_tokens=2),
        replace(base, text="abcd", token_ids=[10], logprobs=[lp(10)], delta_text="d",
                delta_token_ids=[10], finished=True, finish_reason="stop",
                num_cached_tokens=2),
    ]  # fmt: skip


def test_outputs_cross_equal_field_by_field() -> None:
    sent, received = SentState(), ReceivedState("hi", PROMPT)
    for out in outputs():
        assert received.decode(unpack(pack(sent.encode(out)))) == out


def test_prompt_logprobs_cross_once() -> None:
    sent = SentState()
    items = [sent.encode(out) for out in outputs()]
    assert [item[10] is not None for item in items] == [True, False, False]


def test_an_output_without_its_prompt_stays_bare() -> None:
    """An output the loop made without the sequence (prompt None, no ids) keeps them so."""
    out = RequestOutput("r", None, [], finished=True, finish_reason="error", error="boom")
    received = ReceivedState("hi", PROMPT).decode(unpack(pack(SentState().encode(out))))
    assert received == out


def test_output_without_deltas_carries_its_text_as_the_tail() -> None:
    """No detokenizer (no tokenizer, not streaming): the final text is all tail."""
    out = RequestOutput("r", None, PROMPT, text="whole", token_ids=[9], finished=True)
    assert ReceivedState(None, PROMPT).decode(unpack(pack(SentState().encode(out)))) == out


def test_sampling_params_cross_equal() -> None:
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_k=3, seed=9, stop=("x", "yz"), stop_token_ids=(4,),
        logprobs=2, logit_bias={17: 1.5, 3: -2.0}, bad_words=("bad",), min_tokens=1,
        structured_output=StructuredOutput.json_schema({"type": "object"}, strict=False),
        cache_salt="tenant", session_id="s", cache_ttl_s=5.0,
    )  # fmt: skip
    assert params_from_wire(unpack(pack(params_to_wire(params)))) == params
    assert params_to_wire(SamplingParams()) == {}


@pytest.mark.parametrize(
    "exc",
    [
        InvalidRequestError("bad", "temperature"),
        ContextLengthError("too long"),
        GrammarCompileError("no", "guided_regex"),
    ],
)
def test_request_errors_cross_with_type_message_and_param(exc: InvalidRequestError) -> None:
    back = error_from_wire(unpack(pack(error_to_wire(exc))))
    assert type(back) is type(exc)
    assert (str(back), getattr(back, "param", None)) == (str(exc), exc.param)


def test_other_errors_cross_as_runtime_errors_naming_their_type() -> None:
    back = error_from_wire(unpack(pack(error_to_wire(KeyError("k")))))
    assert type(back) is RuntimeError and str(back) == "KeyError: 'k'"
