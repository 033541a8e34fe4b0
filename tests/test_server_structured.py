"""Structured outputs over HTTP with the official openai client, on the embedded model:
parse() with a pydantic model, json_object, vLLM's guided_* fields with n > 1 and
streaming, and a 400 that says why for every bad spec."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_utils import ENGINES, RunningServer, start_server

MODEL = "smollm2-135m"


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=50)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


# the default placement only (slow: the embedded model); test_server_process.py compares
# structured answers of both placements
@pytest.fixture(scope="module", params=["process"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    running = start_server(
        ENGINES[request.param](None, kv_cache_memory=0.2, max_model_len=1024), model_name=MODEL
    )
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_parse_with_a_pydantic_model(client: openai.OpenAI, server: RunningServer) -> None:
    r = client.chat.completions.parse(
        model=MODEL,
        messages=ask("Describe Paris as JSON."),  # type: ignore[arg-type]
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    city = r.choices[0].message.parsed
    assert isinstance(city, City)
    assert r.choices[0].finish_reason == "stop"
    assert City.model_validate_json(r.choices[0].message.content or "") == city
    server.assert_no_leaks()


def test_json_object_streams_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("Give a JSON object with a name and an age."),  # type: ignore[arg-type]
        response_format={"type": "json_object"}, max_tokens=60, temperature=0, stream=True,
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].finish_reason == "stop"


def test_guided_fields_with_n_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The best color is", max_tokens=10, temperature=1.0, seed=5, n=3,
        extra_body={"guided_choice": ["red", "green", "blue"]},
    )  # fmt: skip
    assert all(c.text in {"red", "green", "blue"} for c in r.choices)
    assert all(c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(
        model=MODEL, messages=ask("A date please"), max_tokens=20, temperature=0.7, n=2,  # type: ignore[arg-type]
        extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"},
    )  # fmt: skip
    for choice in r.choices:
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", choice.message.content or "")
    grammar = 'root ::= "yes" | "no" | "maybe"'
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Is the sky blue?"), max_tokens=5, temperature=0,  # type: ignore[arg-type]
        extra_body={"guided_grammar": grammar},
    )  # fmt: skip
    assert r.choices[0].message.content in {"yes", "no", "maybe"}


def test_constrained_output_reaching_max_tokens_is_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Describe Paris as JSON."), max_tokens=5, temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {
            "name": "city", "schema": City.model_json_schema(), "strict": True,
        }},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


@pytest.mark.parametrize(
    ("extra", "param", "reason"),
    [
        ({"guided_regex": "(unclosed"}, "guided_regex", "could not be compiled"),
        ({"guided_grammar": "root ::= nothing"}, "guided_grammar", "could not be compiled"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json", "could not be compiled"),
        ({"guided_json": "{not json"}, "guided_json", "not JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
            "response_format",
            "could not be compiled",
        ),
    ],
)
def test_bad_specs_are_400_with_the_reason(
    server: RunningServer, extra: dict[str, object], param: str, reason: str
) -> None:
    body = {"model": MODEL, "messages": ask("x"), "max_tokens": 3, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and reason in error["message"], error


def test_completions_take_response_format_too(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="A JSON object describing a cat:", max_tokens=60, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].text), dict)
    assert r.choices[0].finish_reason == "stop"
