"""Outputs do not depend on scheduling limits: token budget, pool size, prefix caching,
or when requests arrive."""

from __future__ import annotations

from typing import Any

import pytest

from strata import LLM, SamplingParams
from tests.conftest import assert_no_leaks

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Tell me a fact about the moon.",
    "Why is the sky blue?",
]
PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(embedded_llm: LLM) -> list[list[int]]:
    shared = "You are a careful assistant. Answer briefly and precisely. "
    return [
        embedded_llm.chat_prompt_ids([{"role": "user", "content": shared + q}]) for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def reference(embedded_llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in embedded_llm.generate(prompts, PARAMS)]


def _run(prompts: list[list[int]], **engine_args: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(device="cpu", **{"kv_cache_memory": 0.5, **engine_args})
    outs = llm.generate(prompts, PARAMS)
    assert_no_leaks(llm)
    return [o.token_ids for o in outs], llm


def test_tiny_token_budget_forces_chunked_prefill(prompts: Any, reference: Any) -> None:
    tokens, _ = _run(prompts, max_num_batched_tokens=7)
    assert tokens == reference


def test_tiny_pool_forces_preemption(prompts: Any, reference: Any) -> None:
    # 6 blocks of 16 hold one 96-token sequence; four ~55-token sequences must take turns.
    tokens, llm = _run(prompts, num_kv_blocks=6, max_model_len=96)
    assert tokens == reference
    assert llm.stats()["num_preemptions"] > 0


def test_prefix_caching_off(prompts: Any, reference: Any) -> None:
    tokens, llm = _run(prompts, enable_prefix_caching=False)
    assert tokens == reference
    assert llm.stats()["prefix_cache_hit_tokens"] == 0


def test_prefix_caching_on_hits_the_shared_prefix(prompts: Any, reference: Any) -> None:
    tokens, llm = _run(prompts, max_num_seqs=1)  # one at a time: later ones hit the first's blocks
    assert tokens == reference
    assert llm.stats()["prefix_cache_hit_tokens"] > 0


def test_sequences_arriving_mid_run(embedded_llm: LLM, prompts: Any, reference: Any) -> None:
    engine = embedded_llm.engine
    done: dict[str, list[int]] = {}
    ids = [engine.add_request(prompts[0], PARAMS), engine.add_request(prompts[1], PARAMS)]
    for step in range(40):
        if step == 3:
            ids.append(engine.add_request(prompts[2], PARAMS))
        if step == 9:
            ids.append(engine.add_request(prompts[3], PARAMS))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[i] for i in ids] == reference
    assert_no_leaks(embedded_llm)
