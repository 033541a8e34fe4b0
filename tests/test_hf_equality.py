"""Greedy tokens equal HF transformers', and logits agree (fp32: max abs diff < 1e-3)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from strata import LLM, SamplingParams
from tests.conftest import TINY_CONFIGS, assert_no_leaks, hf_greedy

PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11], [400, 8], list(range(30, 67))]


def _record_logits(llm: LLM) -> list[torch.Tensor]:
    """Spy on the runner: keep a copy of every step's logits (rows in chunk order)."""
    seen: list[torch.Tensor] = []
    runner = llm.engine.runner
    compute = runner.compute_logits

    def recording(plan: Any, feed: Any = None) -> torch.Tensor | None:
        logits = compute(plan, feed)
        if logits is not None:
            seen.append(logits.clone())
        return logits

    runner.compute_logits = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_and_logits_match_hf(name: str, tiny_models: dict[str, Any]) -> None:
    folder, hf = tiny_models[name]
    llm = LLM(str(folder), device="cpu", kv_cache_memory=0.01, block_size=4)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for prompt in PROMPTS:
        logits = _record_logits(llm)
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == hf_greedy(hf, prompt, 12)
        ids = prompt + out.token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        # Step i sampled output token i from the logits at position len(prompt) - 1 + i.
        ours = torch.cat(logits)
        expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(out.token_ids)]
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() < 1e-3
    assert_no_leaks(llm)


def test_batch_of_mixed_lengths_matches_hf(tiny_models: dict[str, Any]) -> None:
    folder, hf = tiny_models["llama-gqa"]
    llm = LLM(str(folder), device="cpu", kv_cache_memory=0.01, block_size=4)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 10)
        assert out.finish_reason == "length"
    assert_no_leaks(llm)


def test_logprobs_match_hf(tiny_models: dict[str, Any]) -> None:
    folder, hf = tiny_models["qwen2"]
    llm = LLM(str(folder), device="cpu", kv_cache_memory=0.01)
    prompt = PROMPTS[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i, step in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert step.token_id == out.token_ids[i]
        assert abs(step.logprob - row[step.token_id].item()) < 1e-4
        top = row.topk(3)
        assert [t for t, _ in step.top] == top.indices.tolist()
        assert (
            max(abs(a - b) for (_, a), b in zip(step.top, top.values.tolist(), strict=True)) < 1e-4
        )


def test_sliding_window_caps_the_context(tmp_path: Any) -> None:
    from transformers import MistralConfig

    from tests.conftest import TINY, make_hf_model

    make_hf_model(MistralConfig(**{**TINY, "sliding_window": 32})).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), device="cpu", kv_cache_memory=0.01)
    assert llm.engine.max_model_len == 32
    with pytest.raises(ValueError, match=r"exceeds the context length 32"):
        llm.generate([[5] * 20], SamplingParams(max_tokens=20))
