"""SamplingParams validation: each bad value raises InvalidRequestError naming the limit."""

from __future__ import annotations

import math
from typing import Any

import pytest

from strata.engine.sampling_params import SamplingParams
from strata.errors import InvalidRequestError, StrataError


def _rejects(pattern: str, **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError, match=pattern) as err:
        SamplingParams(**kwargs)
    return err.value


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.seed is None
    assert p.stop == ()
    assert p.stop_token_ids == ()
    assert p.ignore_eos is False
    assert p.logprobs is None
    assert p.skip_special_tokens is True
    assert p.greedy is False
    assert SamplingParams.MAX_LOGPROBS == 20


def test_invalid_request_error_is_value_error() -> None:
    assert issubclass(InvalidRequestError, ValueError)
    assert issubclass(InvalidRequestError, StrataError)
    with pytest.raises(ValueError, match=r"max_tokens"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize("value", [0, -1, -100])
def test_max_tokens_must_be_positive(value: int) -> None:
    err = _rejects(r"max_tokens must be an integer >= 1", max_tokens=value)
    assert (
        str(err) == f"max_tokens must be an integer >= 1 (0 only with prompt_logprobs), got {value}"
    )


def test_max_tokens_must_be_integer() -> None:
    err = _rejects(r"max_tokens must be an integer >= 1", max_tokens=2.5)
    assert str(err) == "max_tokens must be an integer >= 1 (0 only with prompt_logprobs), got 2.5"
    assert err.param == "max_tokens"


def test_max_tokens_zero_only_scores_the_prompt() -> None:
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
    _rejects(r"prompt_logprobs must be in \[0, 20\], got 21", prompt_logprobs=21)


def test_max_tokens_none_and_one_accepted() -> None:
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(max_tokens=1).max_tokens == 1


@pytest.mark.parametrize("value", [-0.01, -1.0, -math.inf])
def test_temperature_must_be_non_negative(value: float) -> None:
    err = _rejects(r"temperature must be a finite number >= 0", temperature=value)
    assert str(err) == f"temperature must be a finite number >= 0, got {value}"


def test_temperature_zero_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).greedy is True
    assert SamplingParams(temperature=0).greedy is True
    assert SamplingParams(temperature=1e-6).greedy is False


@pytest.mark.parametrize("value", [0.0, -0.5, 1.0000001, 1.5, math.nan])
def test_top_p_must_be_in_half_open_unit_interval(value: float) -> None:
    err = _rejects(r"top_p must be in \(0, 1\]", top_p=value)
    assert str(err) == f"top_p must be in (0, 1], got {value}"


@pytest.mark.parametrize("value", [1e-9, 0.5, 1.0])
def test_top_p_accepted(value: float) -> None:
    assert SamplingParams(top_p=value).top_p == value


@pytest.mark.parametrize("value", [-2, -100, 2**31, 2**63, 2**64])
def test_top_k_out_of_range(value: int) -> None:
    err = _rejects(r"top_k must be -1 \(disabled\) or an integer in \[0, 2147483647\]", top_k=value)
    assert str(err) == f"top_k must be -1 (disabled) or an integer in [0, 2147483647], got {value}"
    assert err.param == "top_k"


@pytest.mark.parametrize("value", [2.0, True])
def test_top_k_must_be_integer(value: object) -> None:
    pattern = r"top_k must be -1 \(disabled\) or an integer in \[0, 2147483647\], got "
    _rejects(pattern + str(value), top_k=value)


@pytest.mark.parametrize("value", [-1, 0, 1, 50])
def test_top_k_accepted(value: int) -> None:
    assert SamplingParams(top_k=value).top_k == value


@pytest.mark.parametrize("value", [-1, 21, 100])
def test_logprobs_out_of_range(value: int) -> None:
    err = _rejects(r"logprobs must be in \[0, 20\]", logprobs=value)
    assert str(err) == f"logprobs must be in [0, 20], got {value}"


@pytest.mark.parametrize("value", [None, 0, 1, 20])
def test_logprobs_accepted(value: int | None) -> None:
    assert SamplingParams(logprobs=value).logprobs == value


@pytest.mark.parametrize("value", ["7", 7.0, True, -1, 2**32, 2**64])
def test_seed_must_be_a_32_bit_integer(value: object) -> None:
    err = _rejects(rf"seed must be an integer in \[0, 4294967295\], got {value!r}", seed=value)
    assert err.param == "seed"


def test_seed_accepted() -> None:
    assert SamplingParams(seed=7).seed == 7
    assert SamplingParams(seed=2**32 - 1).seed == 2**32 - 1


def test_empty_stop_string_rejected() -> None:
    err = _rejects(r"stop strings must be non-empty strings", stop=("ok", ""))
    assert str(err) == (
        "stop strings must be non-empty strings of at most 1024 characters, got ['ok', '']"
    )
    assert err.param == "stop"
    _rejects(r"stop strings must be non-empty strings.*, got \[''\]", stop="")
    _rejects(r"stop strings must be non-empty strings", stop=[""])


def test_non_string_stop_rejected() -> None:
    _rejects(r"stop strings must be non-empty strings.*, got \[3\]", stop=[3])


def test_stop_strings_are_bounded() -> None:
    err = _rejects(r"at most 64 stop strings, got 65", stop=[f"s{i}" for i in range(65)])
    assert err.param == "stop"
    _rejects(r"at most 1024 characters", stop=["x" * 1025])
    assert len(SamplingParams(stop=["x" * 1024] * 64).stop) == 64
    _rejects(r"stop_token_ids must be at most 1024", stop_token_ids=[1] * 1025)


def test_single_stop_string_normalised_to_tuple() -> None:
    p = SamplingParams(stop="###")
    assert p.stop == ("###",)
    assert isinstance(p.stop, tuple)


def test_stop_sequences_normalised_to_tuples() -> None:
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[5, 6]).stop_token_ids == (5, 6)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()  # type: ignore[arg-type]


def test_stop_token_ids_must_be_non_negative_integers() -> None:
    err = _rejects(r"stop_token_ids must be at most 1024 non-negative", stop_token_ids=[1, -1])
    assert str(err) == "stop_token_ids must be at most 1024 non-negative integers, got (1, -1)"
    _rejects(r"stop_token_ids must be", stop_token_ids=[True])


def test_params_are_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


def test_nan_temperature_rejected() -> None:
    _rejects(r"temperature must be a finite number >= 0", temperature=math.nan)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
        ({"frequency_penalty": math.nan}, "frequency_penalty must be in [-2, 2], got nan"),
        (
            {"repetition_penalty": 0.0},
            "repetition_penalty must be in [0.01, 100] (1 = off), got 0.0",
        ),
        (
            {"repetition_penalty": 1e300},
            "repetition_penalty must be in [0.01, 100] (1 = off), got 1e+300",
        ),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens (5) must not exceed max_tokens (4)"),
        ({"bad_words": ["ok", " "]}, "bad_words must be non-empty strings, got ('ok', ' ')"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias keys must be token ids (integers >= 0), got 'x'"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids (integers >= 0), got -1"),
        ({"logit_bias": {5: 101}}, "logit_bias values must be in [-100, 100], got 101 for token 5"),
    ],
)
def test_penalties_and_biases_out_of_range(kwargs: dict[str, Any], message: str) -> None:
    err = _rejects(".", **kwargs)
    assert str(err) == message
    assert err.param == next(iter(kwargs))


def test_penalties_and_biases_normalised() -> None:
    p = SamplingParams(logit_bias={"5": 1, 7: -100.0}, bad_words="word", min_tokens=3)
    assert p.logit_bias == {5: 1.0, 7: -100.0}
    assert p.bad_words == ("word",)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0, 0, 1, 0)
