"""Prompt logprobs: equal to the reference model's log-softmax over the prompt, the same
whether the prompt is computed in chunks, found in the prefix cache or preempted, and
max_tokens 0 scores the prompt without generating."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from strata import LLM, SamplingParams
from strata.engine.outputs import RequestOutput
from tests.conftest import assert_no_leaks

PROMPT = [5, 17, 99, 3, 42, 42, 8, 250, 13, 77, 400, 1, 9, 9, 31, 64, 128, 7, 6, 200]


def _reference(hf: Any, prompt: list[int], k: int) -> list[tuple[int, float, list[int]]]:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    out = []
    for p in range(len(prompt) - 1):
        top = logprobs[p].topk(k).indices.tolist() if k else []
        out.append((prompt[p + 1], float(logprobs[p, prompt[p + 1]]), top))
    return out


def _check(out: RequestOutput, reference: list[tuple[int, float, list[int]]], k: int) -> None:
    assert out.prompt_logprobs is not None
    assert len(out.prompt_logprobs) == len(reference)
    for entry, (token, lp, top) in zip(out.prompt_logprobs, reference, strict=True):
        assert entry.token_id == token
        assert abs(entry.logprob - lp) < 1e-3
        assert [t for t, _ in entry.top] == top
        assert len(entry.top) == k


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Any]) -> tuple[str, Any]:
    folder, hf = tiny_models["llama"]
    return str(folder), hf


def test_prompt_logprobs_match_hf_in_chunks_and_from_the_cache(model: tuple[str, Any]) -> None:
    folder, hf = model
    llm = LLM(folder, device="cpu", kv_cache_memory=0.01, block_size=4, max_num_batched_tokens=6)
    reference = _reference(hf, PROMPT, 3)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    first = llm.generate(PROMPT, params)[0]
    _check(first, reference, 3)
    # The prompt's blocks are cached now; a scoring request computes them again.
    again = llm.generate(PROMPT, params)[0]
    _check(again, reference, 3)
    assert again.num_cached_tokens == 0
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens == 16
    assert plain.token_ids == first.token_ids
    assert_no_leaks(llm)


def test_max_tokens_zero_scores_the_prompt_only(model: tuple[str, Any]) -> None:
    folder, hf = model
    llm = LLM(folder, device="cpu", kv_cache_memory=0.01, block_size=4)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=0, logprobs=2))[0]
    _check(out, _reference(hf, PROMPT, 0), 0)
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    assert out.logprobs == []
    assert_no_leaks(llm)


def test_preempted_scoring_requests_score_each_position_once(model: tuple[str, Any]) -> None:
    folder, hf = model
    llm = LLM(folder, device="cpu", num_kv_blocks=12, block_size=4, max_model_len=48)
    prompts = [PROMPT, PROMPT[::-1], PROMPT[3:] + PROMPT[:3]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params)
    assert llm.stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs, strict=True):
        _check(out, _reference(hf, prompt, 1), 1)
    assert_no_leaks(llm)
