"""Penalties and biases through the whole engine: every greedy token is the argmax of the
step's logits adjusted by the direct per-request computation, and seeded requests
sample the same tokens alone or in any batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strata import LLM, SamplingParams
from strata.engine.sequence import Sequence
from tests.conftest import assert_no_leaks
from tests.test_hf_equality import _record_logits
from tests.test_logits_adjust import _direct

PROMPTS = [[5, 17, 99, 3, 42, 42, 8], [300, 301, 302], [7] * 12]
PENALIZED = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=1.5),
    SamplingParams(
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
        presence_penalty=2.0,
        logit_bias={11: 3.0, 12: -50.0},
    ),
]


@pytest.fixture(scope="module")
def llm(tiny_models: dict[str, Any]) -> LLM:
    folder, _ = tiny_models["llama"]
    return LLM(str(folder), device="cpu", kv_cache_memory=0.01, block_size=4)


def test_greedy_tokens_are_argmax_of_directly_penalized_logits(llm: LLM) -> None:
    for prompt, params in zip(PROMPTS, PENALIZED, strict=True):
        seen = _record_logits(llm)
        out = llm.generate(prompt, params)[0]
        del llm.engine.runner.compute_logits  # back to the class's method
        probe = llm.engine.prepare(prompt, params)  # the same rules, resolved as the engine does
        assert len(seen) == len(out.token_ids) == 12
        for step, logits in enumerate(seen):
            seq = Sequence("x", None, prompt, params, 0, 12, logit_rules=probe.logit_rules)
            seq.token_ids.extend(out.token_ids[:step])
            assert out.token_ids[step] == int(_direct(logits[0], seq).argmax())
        plain = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert plain[0].token_ids != out.token_ids  # the penalty changed the output
    assert_no_leaks(llm)


def test_seeded_penalized_request_is_the_same_in_any_batch(llm: LLM) -> None:
    params = SamplingParams(
        max_tokens=10, temperature=1.0, seed=77, ignore_eos=True, frequency_penalty=1.0,
        repetition_penalty=1.3, logit_bias={4: 2.0}, min_p=0.05,
    )  # fmt: skip
    alone = llm.generate(PROMPTS[0], params)[0].token_ids
    others = [SamplingParams(max_tokens=7, temperature=0.9, seed=s) for s in (1, 2)]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], params, others[1]])
    assert batch[1].token_ids == alone
    assert_no_leaks(llm)


def test_min_tokens_holds_off_eos(llm: LLM) -> None:
    eos = 2
    forced = SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0})
    assert llm.generate(PROMPTS[1], forced)[0].token_ids == [eos]
    held = SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0}, min_tokens=4)
    out = llm.generate(PROMPTS[1], held)[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:4]
    assert out.finish_reason == "stop"


def test_bad_words_never_appear(tiny_chat_folder: Path) -> None:
    llm = LLM(str(tiny_chat_folder), device="cpu", kv_cache_memory=0.02, max_model_len=256)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    first = llm.generate("The quick brown fox", params)[0]
    word = llm.get_tokenizer().decode(first.token_ids[2:3]).strip()
    assert word
    banned = llm.generate("The quick brown fox", SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, bad_words=[word],
    ))[0]  # fmt: skip
    rules = llm.engine.prepare("x", SamplingParams(bad_words=[word])).logit_rules
    assert rules is not None
    for ids in rules.bad_words:
        n = len(ids)
        windows = [tuple(banned.token_ids[i : i + n]) for i in range(len(banned.token_ids))]
        assert ids not in windows
    # Identical up to where the unconstrained output completed a bad word.
    ends = [
        i + 1 for i in range(len(first.token_ids)) for ids in rules.bad_words
        if tuple(first.token_ids[i + 1 - len(ids) : i + 1]) == ids
    ]  # fmt: skip
    k = min(ends) - 1  # the first banned token the unconstrained output chose
    assert k <= 2
    assert banned.token_ids[:k] == first.token_ids[:k] and banned.token_ids[k] != first.token_ids[k]
    assert_no_leaks(llm)


def test_stop_strings_wait_for_min_tokens(tiny_chat_folder: Path) -> None:
    llm = LLM(str(tiny_chat_folder), device="cpu", kv_cache_memory=0.02, max_model_len=256)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    text = llm.generate("The quick brown fox", params)[0].text
    tok = llm.get_tokenizer()
    stop = tok.decode(tok.encode(text, add_special_tokens=False)[:1])
    early = llm.generate("The quick brown fox", SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, stop=[stop],
    ))[0]  # fmt: skip
    assert early.text == "" and len(early.token_ids) == 1
    late = llm.generate("The quick brown fox", SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, stop=[stop], min_tokens=3,
    ))[0]  # fmt: skip
    assert len(late.token_ids) >= 3
    assert_no_leaks(llm)
