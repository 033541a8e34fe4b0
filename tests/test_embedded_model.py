"""The embedded SmolLM2-135M-Instruct: HF equality on a mixed batch, answers, stops."""

from __future__ import annotations

from typing import Any

from strata import LLM, SamplingParams
from tests.conftest import hf_greedy

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea, please, in the style of an old sailor.",
    "2+2=",
]


def test_mixed_batch_greedy_equals_hf(embedded_llm: LLM, embedded_hf: Any) -> None:
    prompts = [embedded_llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts.append(list(range(1000, 1003)))  # a 3-token raw prompt beside ~40-token ones
    outs = embedded_llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    eos = embedded_llm.engine.loaded.eos_token_ids
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(embedded_hf, prompt, 16, set(eos))
    embedded_llm.check_integrity()


def test_answers_the_france_question(embedded_llm: LLM) -> None:
    out = embedded_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0),
    )[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in embedded_llm.engine.loaded.eos_token_ids


def test_stop_string_is_cut_from_text(embedded_llm: LLM) -> None:
    params = SamplingParams(max_tokens=32, temperature=0, stop=[" is"])
    out = embedded_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], params
    )[0]
    assert out.text == "The capital of France"
    assert out.finish_reason == "stop"


def test_stop_token_ids_and_length(embedded_llm: LLM) -> None:
    prompt = embedded_llm.chat_prompt_ids(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    full = embedded_llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0))[0]
    stop_at = full.token_ids[2]
    out = embedded_llm.generate(
        prompt, SamplingParams(max_tokens=32, temperature=0, stop_token_ids=[stop_at])
    )[0]
    assert out.token_ids == full.token_ids[:3] and out.finish_reason == "stop"
    out = embedded_llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.token_ids == full.token_ids[:4] and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_in_any_batch(embedded_llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = embedded_llm.generate("Once upon a time", seeded)[0]
    others = SamplingParams(max_tokens=20, temperature=1.0)
    batch = embedded_llm.generate(
        ["A list of fruits:", "Once upon a time", "Hello"], [others, seeded, others]
    )
    assert batch[1].token_ids == alone.token_ids
    reseeded = embedded_llm.generate(
        "Once upon a time", SamplingParams(**{**seeded.__dict__, "seed": 99})
    )
    assert reseeded[0].token_ids != alone.token_ids


def test_streaming_deltas_add_up_to_the_text(embedded_llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0)
    prompt = embedded_llm.chat_prompt_ids([{"role": "user", "content": "Name three colors."}])
    deltas = [o.delta_text for o in embedded_llm.stream(prompt, params)]
    final = embedded_llm.generate(prompt, params)[0]
    assert len(deltas) == len(final.token_ids)
    assert "".join(deltas) == final.text
    embedded_llm.check_integrity()
