"""Tool-calling correctness on the embedded model: 20 conversations through the server's
own request handling (the request model, the chat template with the tools described in
the system message, the tool_choice grammar, the output parsing), run offline:

    8  single call     tool_choice: a named function
    6  parallel calls  tool_choice: required, two questions in one turn
    6  follow-up       a turn with the assistant's call and the tool's result, then a
                       required call for the next question

Every call must parse, name a tool of the request and carry arguments valid against its
schema (jsonschema_rs). Prints the counts.

    python benchmarks/tool_quality.py
"""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema_rs

from strata import LLM, SamplingParams
from strata.engine.chat import chat_prompt_ids
from strata.server.chat_prompt import template_messages
from strata.server.protocol import ChatCompletionRequest
from strata.server.tool_output import ToolCalls

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]},
    }},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "minimum": 0},
            "from": {"enum": ["USD", "EUR", "GBP", "JPY"]},
            "to": {"enum": ["USD", "EUR", "GBP", "JPY"]}}, "required": ["amount", "from", "to"]},
    }},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Find flights between two airports",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["origin", "destination", "passengers"]},
    }},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome"]


def _conversations() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names = list(SCHEMAS)
    for i in range(8):
        name = names[i % 3]
        ask = [f"What is the weather in {CITIES[i]}?", f"Convert {10 * (i + 1)} USD to EUR.",
               f"Find flights from JFK to LHR for {i % 4 + 1} people."][i % 3]  # fmt: skip
        out.append({"messages": [{"role": "user", "content": ask}],
                    "tool_choice": {"type": "function", "function": {"name": name}}})  # fmt: skip
    for i in range(6):
        ask = f"What is the weather in {CITIES[i]} and in {CITIES[i + 1]}?"
        out.append({"messages": [{"role": "user", "content": ask}], "tool_choice": "required"})
    for i in range(6):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": json.dumps({"city": CITIES[i], "unit": "celsius"}),
            },
        }
        out.append({"tool_choice": "required", "messages": [
            {"role": "user", "content": f"Weather in {CITIES[i]}, then convert 5 GBP to JPY."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{12 + i} degrees"},
        ]})  # fmt: skip
    return out


def main() -> None:
    llm = LLM(device="cpu", kv_cache_memory=0.5, max_model_len=2048)
    bodies = [ChatCompletionRequest.model_validate({**c, "tools": TOOLS}) for c in _conversations()]
    prompts, params = [], []
    for body in bodies:
        mode, _ = body.tool_mode()
        messages, tools = template_messages(body, llm.get_tokenizer(), mode)
        prompts.append(chat_prompt_ids(llm.get_tokenizer(), messages, "smollm2", True, tools))
        params.append(
            SamplingParams(max_tokens=200, temperature=0, structured_output=body.structured()[1])
        )
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    calls = valid = with_calls = parallel = 0
    for body, out in zip(bodies, outs, strict=True):
        mode, named = body.tool_mode()
        _, parsed = ToolCalls(mode, named).split(out.text)
        with_calls += bool(parsed)
        if not parsed:
            print(f"no calls ({out.finish_reason}, {len(out.token_ids)} tokens): {out.text[:80]!r}")
        parallel += len(parsed) > 1
        for call in parsed:
            calls += 1
            try:
                jsonschema_rs.validate(SCHEMAS[call.name], json.loads(call.arguments))
                valid += 1
            except (KeyError, ValueError, jsonschema_rs.ValidationError) as exc:
                print(f"invalid call {call}: {exc}")
    print(
        f"{with_calls}/{len(bodies)} conversations produced tool calls ({parallel} with "
        f"several); {valid}/{calls} calls parse and validate; {seconds:.1f} s on CPU"
    )


if __name__ == "__main__":
    main()
