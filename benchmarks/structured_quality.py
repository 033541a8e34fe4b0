"""Structured-output correctness on the embedded model: 50 prompts, each with its own JSON
schema (nested objects, enums, arrays, numbers with bounds); every output must parse and
validate against its schema (jsonschema_rs). Runs on CPU in about a minute.

    python benchmarks/structured_quality.py [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import jsonschema_rs

from strata import LLM, SamplingParams
from strata.engine.structured_output import StructuredOutput

SUBJECTS = ["a book", "a city", "a recipe", "a car", "a planet", "a song", "a company",
            "a movie", "a sports team", "a mountain"]  # fmt: skip


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([10, 20, 40])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 100, 1e6])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], 3)}
    return {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1,
            "maxItems": 3}  # fmt: skip


def make_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(["name", "year", "score", "tags", "kind", "active", "size", "rating",
                        "origin", "count", "label", "price"], rng.randint(2, 4))  # fmt: skip
    props = {n: _leaf(rng) for n in names}
    if depth < 2 and rng.random() < 0.5:
        props["details"] = make_schema(rng, depth + 1)
    if depth == 0 and rng.random() < 0.3:
        props["items"] = {"type": "array", "items": make_schema(rng, 2), "maxItems": 2}
    return {"type": "object", "properties": props, "required": list(props)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()
    rng = random.Random(0)
    schemas = [make_schema(rng) for _ in range(args.count)]
    llm = LLM(device="cpu", kv_cache_memory=0.5, max_model_len=2048)
    asks = [
        f"Describe {SUBJECTS[i % len(SUBJECTS)]} as JSON matching this schema: {json.dumps(s)}"
        for i, s in enumerate(schemas)
    ]
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": ask}]) for ask in asks]
    params = [
        SamplingParams(
            max_tokens=args.max_tokens,
            temperature=0,
            structured_output=StructuredOutput.json_schema(s),
        )
        for s in schemas
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    valid, reasons = 0, {"stop": 0, "length": 0}
    for schema, out in zip(schemas, outs, strict=True):
        reasons[out.finish_reason or "?"] = reasons.get(out.finish_reason or "?", 0) + 1
        try:
            jsonschema_rs.validate(schema, json.loads(out.text))
            valid += 1
        except (ValueError, jsonschema_rs.ValidationError) as exc:
            print(f"invalid ({out.finish_reason}): {exc}\n  {out.text[:200]!r}")
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"{valid}/{len(schemas)} outputs parse and validate; finish reasons {reasons}; "
          f"{tokens} tokens in {seconds:.1f} s on CPU")


if __name__ == "__main__":
    main()
