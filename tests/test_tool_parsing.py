"""Tool calling without a model: parsers, stream deltas, tool_choice resolution and the
grammar that enforces it, and how tool turns reach a template."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest

from strata.errors import InvalidRequestError
from strata.server.protocol import ChatCompletionRequest
from strata.server.tool_output import ToolCalls
from strata.server.tool_parsers import HermesParser, Llama3JsonParser, ToolCall, parser_for
from strata.server.tools import NamedFunction, NamedToolChoice, ToolSpec, resolve_choice

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [ToolSpec.model_validate(WEATHER), ToolSpec.model_validate(TIME)]


def test_hermes_parses_calls_and_keeps_content() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = HermesParser().parse(text)
    assert content == "Let me check."
    assert calls == [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}")]
    # An unterminated last block (cut at the stop token) still parses.
    _, calls = HermesParser().parse('<tool_call>{"name": "get_time", "arguments": {}}')
    assert calls == [ToolCall("get_time", "{}")]
    bad = 'Sure <tool_call>{"name": "get_time", "arguments": {</tool_call>'
    assert HermesParser().parse(bad) == (bad, [])
    assert HermesParser().parse("plain answer") == ("plain answer", [])


def test_llama3_json_parses_one_or_several_calls() -> None:
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    assert Llama3JsonParser().parse(text) == (
        None,
        [ToolCall("get_weather", '{"city": "Rome"}'), ToolCall("get_time", "{}")],
    )
    assert Llama3JsonParser().parse("The answer is 4.") == ("The answer is 4.", [])
    assert Llama3JsonParser().parse('{"no": "name"}') == ('{"no": "name"}', [])


def test_parser_is_chosen_from_the_template_or_by_name() -> None:
    class Tok:
        def __init__(self, template: str) -> None:
            self.chat_template = template

    assert isinstance(parser_for(Tok("{{ '<tool_call>' }} tools"), None), HermesParser)
    assert isinstance(parser_for(Tok("<|python_tag|> ipython tools"), None), Llama3JsonParser)
    assert isinstance(parser_for(Tok("no tools here"), None), HermesParser)
    assert isinstance(parser_for(Tok("no tools here"), "llama3_json"), Llama3JsonParser)
    with pytest.raises(
        ValueError, match="unknown tool call parser 'x'; valid: hermes, llama3_json"
    ):
        parser_for(Tok(""), "x")


def _stream(calls: ToolCalls, pieces: list[str]) -> list[dict[str, Any]]:
    stream = calls.stream()
    deltas = [d for p in pieces for d in stream.feed(p)]
    return deltas + stream.end()


def test_auto_stream_sends_content_then_calls_holding_back_a_marker_prefix() -> None:
    pieces = ["Hi", " there <tool", '_call>{"name": "get_time", ', '"arguments": {}}</tool_call>']
    deltas = _stream(ToolCalls("auto", parser=HermesParser()), pieces)
    assert deltas[:2] == [{"content": "Hi"}, {"content": " there "}]
    (call,) = deltas[2]["tool_calls"]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_time", "arguments": "{}"}
    assert len(deltas) == 3
    # A tail that only looked like a marker goes out as content in the end.
    assert _stream(ToolCalls("auto", parser=HermesParser()), ["a <tool", "s"]) == [
        {"content": "a "},
        {"content": "<tools"},
    ]


def test_named_stream_opens_the_call_and_streams_arguments() -> None:
    named = TOOLS[0].function
    deltas = _stream(ToolCalls("named", named), ['{"city"', "", ': "Oslo"}'])
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert deltas[1] == {"tool_calls": [{"index": 0, "function": {"arguments": ': "Oslo"}'}}]}
    assert len(deltas) == 2


def _merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call deltas folded into whole calls, as the openai client folds them."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for part in delta["tool_calls"]:
            call = calls.setdefault(part["index"], {"id": part.get("id"), "name": "", "args": ""})
            call["name"] += part["function"].get("name", "")
            call["args"] += part["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def test_required_stream_opens_each_call_then_streams_its_arguments() -> None:
    text = (
        '[{"name": "get_time", "arguments": {}}, '
        '{"name": "get_weather", "arguments": {"city": "L}i\\"ma", "tags": ["a", {"b": 1}]}}]'
    )
    for size in (1, 3, 7, len(text)):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        stream = ToolCalls("required").stream()
        deltas = [d for p in pieces for d in stream.feed(p)] + stream.end()
        calls = _merged(deltas)
        assert [c["name"] for c in calls] == ["get_time", "get_weather"], size
        assert [json.loads(c["args"]) for c in calls] == [
            {},
            {"city": 'L}i"ma', "tags": ["a", {"b": 1}]},
        ]
        assert all(c["id"].startswith("call_") for c in calls) and stream.called
        if size == 1:  # the first call opens before the second is generated
            first_open = next(i for i, d in enumerate(deltas) if d["tool_calls"][0]["index"] == 1)
            assert first_open > 1
    # Cut short by max_tokens: the calls it completed.
    content, cut = ToolCalls("required").split(text[:-12])
    assert content is None and [c.name for c in cut] == ["get_time"]
    assert ToolCalls("required").split('[{"name": "get_ti') == ('[{"name": "get_ti', [])


def test_tool_choice_resolution() -> None:
    assert resolve_choice(TOOLS, None) == ("auto", None)
    assert resolve_choice(None, None) == ("none", None)
    assert resolve_choice(TOOLS, "required") == ("required", None)
    named = NamedToolChoice(function=NamedFunction(name="get_time"))
    assert resolve_choice(TOOLS, named) == ("named", TOOLS[1].function)
    with pytest.raises(InvalidRequestError, match="'nope', which is not among the tools") as err:
        resolve_choice(TOOLS, NamedToolChoice(function=NamedFunction(name="nope")))
    assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError, match="tool_choice needs tools"):
        resolve_choice(None, "required")


def _body(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, TIME], **kw}
    )


def test_required_grammar_accepts_exactly_calls_of_the_tools() -> None:
    field, spec = _body(tool_choice="required").structured()
    assert field == "tool_choice" and spec is not None
    schema = json.loads(spec.spec)
    ok = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]
    assert jsonschema_rs.is_valid(schema, ok)
    assert not jsonschema_rs.is_valid(schema, [])
    assert not jsonschema_rs.is_valid(schema, [{"name": "other", "arguments": {}}])
    assert not jsonschema_rs.is_valid(schema, [{"name": "get_weather", "arguments": {}}])
    _, single = _body(tool_choice="required", parallel_tool_calls=False).structured()
    assert single is not None and json.loads(single.spec)["maxItems"] == 1
    _, named = _body(
        tool_choice={"type": "function", "function": {"name": "get_weather"}}
    ).structured()
    assert named is not None and json.loads(named.spec) == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert _body().structured() == (None, None)  # auto: no grammar
    with pytest.raises(InvalidRequestError, match="cannot be combined with response_format"):
        _body(tool_choice="required", response_format={"type": "json_object"}).structured()


def test_tool_turns_render_natively_or_as_hermes_text() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]})  # fmt: skip
    native = body.messages[1].as_template_message(template_has_tools=True)
    assert native["tool_calls"] == [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }]  # fmt: skip
    text = body.messages[1].as_template_message(template_has_tools=False)
    assert "tool_calls" not in text
    assert text["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    tool = body.messages[2].as_template_message()
    assert tool == {"role": "tool", "content": "21 C", "tool_call_id": "call_1"}
