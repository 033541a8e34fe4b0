"""Tool calling over HTTP with the official openai client, on the embedded model (whose
template has no tool section, so the tools are described in the system message):
required and named calls enforced by the grammar, auto calls parsed, streaming deltas,
follow-up turns with tool results, and bad tool_choice values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema_rs
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_utils import ENGINES, RunningServer, start_server

MODEL = "smollm2-135m"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": WEATHER_PARAMS,
    }},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                       "required": ["tz"]},
    }},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
REQUIRED = {"tool_choice": "required"}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


# the default placement only (slow: the embedded model); test_server_process.py compares
# structured answers of both placements
@pytest.fixture(scope="module", params=["process"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    running = start_server(
        ENGINES[request.param](None, kv_cache_memory=0.2, max_model_len=2048), model_name=MODEL
    )
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_named_tool_choice_gives_valid_arguments(client: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema_rs.validate(WEATHER_PARAMS, json.loads(call.function.arguments))
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60,
        temperature=0, stream=True,
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == (
        call.function.arguments
    )
    assert chunks[-1].finish_reason == "tool_calls"


def test_required_calls_parallel_and_single(client: openai.OpenAI, server: RunningServer) -> None:
    ask: Any = [{"role": "user", "content": "Weather in Paris and the time in CET?"}]
    for parallel in (True, False):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=120,
            temperature=0, parallel_tool_calls=parallel,
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls or []
        assert calls and r.choices[0].finish_reason == "tool_calls"
        assert parallel or len(calls) == 1
        assert len({c.id for c in calls}) == len(calls)
        for call in calls:
            jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))
        stream = client.chat.completions.create(
            model=MODEL, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=120,
            temperature=0, parallel_tool_calls=parallel, stream=True,
        )  # fmt: skip
        merged: dict[int, list[str]] = {}
        for chunk in stream:
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name, args = merged.setdefault(d.index, ["", ""])
                if d.function is not None:
                    name += d.function.name or ""
                    args += d.function.arguments or ""
                merged[d.index] = [name, args]
        streamed = [merged[i] for i in sorted(merged)]
        assert streamed == [[c.function.name, c.function.arguments] for c in calls]
    server.assert_no_leaks()


def test_auto_calls_are_parsed_from_hermes_blocks(client: openai.OpenAI) -> None:
    # The regex makes the model answer in the format its system message asks for.
    regex = (
        r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
        r'\{"city": "[A-Z][a-z]{1,10}", "unit": "c"\}\}\n</tool_call>'
    )
    kw: Any = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 60,
               "temperature": 0, "extra_body": {"guided_regex": regex}}  # fmt: skip
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert message.content == "Checking."
    (call,) = message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["unit"] == "c"
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks).strip() == "Checking."
    calls = [d for c in chunks for d in c.delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in calls if d.function] == [
        (call.function.name, call.function.arguments)
    ]
    none = client.chat.completions.create(**{**kw, "tool_choice": "none"})
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content and "<tool_call>" in none.choices[0].message.content


def test_follow_up_turn_with_the_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60,
        temperature=0,
    )  # fmt: skip
    call = (first.choices[0].message.tool_calls or [])[0]
    turn: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=turn, tools=TOOLS, max_tokens=30, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage is not None and r.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {"tools": [{"function": {"name": "f", "parameters": {"type": 5}}}], **REQUIRED},
            "tool_choice",
        ),
    ],
)
def test_bad_tool_requests_are_400(
    server: RunningServer, extra: dict[str, object], param: str
) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 3, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


class GetWeather(BaseModel):
    city: str = Field(max_length=20)
    unit: Literal["c", "f"]


def test_parse_round_trip_with_a_pydantic_function_tool(client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(GetWeather)
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, tools=[tool], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert GetWeather.model_validate_json(call.function.arguments) == call.function.parsed_arguments
