"""Structured outputs through xgrammar: the engine's masks equal xgrammar's own matcher
token by token, constrained and unconstrained rows share steps without changing each
other's outputs, preemption resumes exactly, and bad specs fail before anything runs."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import torch
import xgrammar
from transformers import AutoTokenizer

from strata import LLM, SamplingParams
from strata.engine.grammar_mask import GrammarMasks
from strata.engine.structured_output import StructuredOutput
from strata.errors import InvalidRequestError
from tests.conftest import TINY, assert_no_leaks

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}
PROMPT = "Describe a person:"


@pytest.fixture(scope="module")
def llm(tiny_chat_folder: Path) -> LLM:
    return LLM(str(tiny_chat_folder), device="cpu", kv_cache_memory=0.02, max_model_len=512)


def _record_masks(llm: LLM) -> list[GrammarMasks]:
    builder = llm.engine.runner.grammar_masks
    original = builder.build
    seen: list[GrammarMasks] = []

    def recording(*args: Any) -> GrammarMasks | None:
        masks = original(*args)
        if masks is not None:  # a copy: the builder reuses its buffer every step
            seen.append(GrammarMasks(masks.rows, masks.bitmask.clone()))
        return masks

    builder.build = recording  # type: ignore[method-assign]
    return seen


def test_masks_equal_xgrammars_matcher_token_by_token(llm: LLM) -> None:
    so = StructuredOutput.json_schema(SCHEMA)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured_output=so)
    seen = _record_masks(llm)
    out = llm.generate(PROMPT, params)[0]
    del llm.engine.runner.grammar_masks.build
    assert len(seen) == len(out.token_ids)
    tokenizer = llm.get_tokenizer()
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=49152, stop_token_ids=sorted(llm.engine.loaded.eos_token_ids)
    )
    matcher = xgrammar.GrammarMatcher(
        xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    )
    expected = xgrammar.allocate_token_bitmask(1, 49152)
    for masks, token in zip(seen, out.token_ids, strict=True):
        assert masks.rows == [0]
        matcher.fill_next_token_bitmask(expected, 0)
        assert torch.equal(masks.bitmask.cpu(), expected)
        assert (int(expected[0, token // 32]) >> (token % 32)) & 1  # the token was allowed
        assert matcher.accept_token(token)
    if out.finish_reason == "stop":
        assert matcher.is_terminated()
        jsonschema_rs.validate(SCHEMA, json.loads(out.text))
    assert_no_leaks(llm)


def test_masked_logits_are_minus_inf_exactly_where_bits_are_zero() -> None:
    logits = torch.randn(3, 64)
    bitmask = torch.full((3, 2), -1, dtype=torch.int32)
    bitmask[1, 0] = 0b1010  # row 1 allows tokens 1 and 3 (and 32..63)
    bitmask[1, 1] = 0
    masked = GrammarMasks([1], bitmask).apply(logits)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed == [1, 3]
    assert torch.equal(masked[1, [1, 3]], logits[1, [1, 3]])


def test_ids_past_the_covered_vocabulary_are_banned_in_constrained_rows() -> None:
    logits = torch.randn(2, 100)
    bitmask = torch.full((2, 2), -1, dtype=torch.int32)  # every covered id allowed
    masked = GrammarMasks([0], bitmask, vocab=64).apply(logits)
    assert torch.equal(masked[0, :64], logits[0, :64])
    assert torch.isneginf(masked[0, 64:]).all()
    assert torch.equal(masked[1], logits[1])


def test_grammars_cover_the_tokenizer_of_a_model_with_a_padded_vocabulary(
    embedded_folder: Path, tmp_path: Path
) -> None:
    AutoTokenizer.from_pretrained(embedded_folder).save_pretrained(tmp_path)
    config = {**TINY, "model_type": "llama", "vocab_size": 49152 + 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(f"random:{tmp_path / 'config.json'}", device="cpu", kv_cache_memory=0.05)
    assert llm.engine.requests.grammars.grammar_vocab == 49152
    so = StructuredOutput.regex("[a-z]{60}")
    params = [
        SamplingParams(max_tokens=10, temperature=1.0, seed=s, structured_output=so)
        for s in range(4)
    ]
    seen = _record_masks(llm)
    outs = llm.generate([f"{PROMPT} {i}" for i in range(4)], params)
    assert all(m.bitmask.shape[1] == 49152 // 32 for m in seen)
    for out in outs:
        assert max(out.token_ids) < 49152
        assert re.fullmatch("[a-z]+", out.text), out.text
    assert_no_leaks(llm)


def test_mixed_batch_equals_solo_runs(llm: LLM) -> None:
    specs = [
        StructuredOutput.json_schema(SCHEMA),
        None,
        StructuredOutput.regex(r"[0-9]{2,4}-[a-z]+"),
        StructuredOutput.choice(["red", "green", "blue"]),
        None,
        StructuredOutput.grammar('root ::= "x" ("y" | "z")+'),
    ]
    params = [
        SamplingParams(max_tokens=24, temperature=0.8, seed=10 + i, structured_output=so)
        for i, so in enumerate(specs)
    ]
    prompts = [f"{PROMPT} {i}" for i in range(len(specs))]
    solo = [llm.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    together = llm.generate(prompts, params)
    assert [o.token_ids for o in together] == [o.token_ids for o in solo]
    assert together[3].text in {"red", "green", "blue"} and together[3].finish_reason == "stop"
    assert together[2].finish_reason in ("stop", "length")
    assert_no_leaks(llm)


def test_preempted_constrained_requests_resume_exactly(tiny_chat_folder: Path, llm: LLM) -> None:
    so = StructuredOutput.json_schema(SCHEMA)
    params = [
        SamplingParams(max_tokens=40, temperature=0.9, seed=s, structured_output=so)
        for s in range(4)
    ]
    prompts = [f"{PROMPT} number {i} " * 3 for i in range(4)]
    reference = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    small = LLM(str(tiny_chat_folder), device="cpu", num_kv_blocks=10, max_model_len=160)
    outs = small.generate(prompts, params)
    assert small.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == reference
    assert_no_leaks(small)


def test_stop_strings_and_length_compose_with_grammars(llm: LLM) -> None:
    so = StructuredOutput.regex(r"x[0-9]{40}")
    free = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, structured_output=so))
    text = free[0].text
    assert re.fullmatch(r"x[0-9]+", text) and free[0].finish_reason == "length"
    stop = text[3:5]
    stopped = llm.generate(PROMPT, SamplingParams(
        max_tokens=6, temperature=0, structured_output=so, stop=[stop],
    ))  # fmt: skip
    assert stopped[0].text == text[: text.index(stop)] and stopped[0].finish_reason == "stop"


def test_uncompilable_specs_are_rejected_with_the_reason(llm: LLM) -> None:
    bad = [
        (StructuredOutput.regex("(unclosed"), "guided_regex"),
        (StructuredOutput.grammar("root ::= undefined_rule"), "guided_grammar"),
        (StructuredOutput.json_schema({"type": "no-such-type"}), "response_format"),
    ]
    for spec, param in bad:
        with pytest.raises(InvalidRequestError, match=r"could not be compiled: .+") as err:
            llm.generate(PROMPT, SamplingParams(structured_output=spec))
        assert err.value.param == param
    assert llm.stats()["num_waiting"] == 0
    with pytest.raises(InvalidRequestError, match="JSON schema is not JSON"):
        StructuredOutput.json_schema("{not json")
    with pytest.raises(InvalidRequestError, match="guided_choice must be a non-empty list"):
        StructuredOutput.choice([])


def test_equal_specs_compile_once(llm: LLM) -> None:
    grammars = llm.engine.requests.grammars
    a = grammars.submit(StructuredOutput.json_schema(SCHEMA))
    b = grammars.submit(StructuredOutput.json_schema(json.dumps(SCHEMA)))
    assert a is b
    assert grammars.submit(StructuredOutput.json_schema(SCHEMA, strict=False)) is not a


def test_a_grammar_left_no_unbanned_token_ends_before_it(llm: LLM) -> None:
    # "ab" completes the grammar, which then allows only EOS; min_tokens bans EOS.
    so = StructuredOutput.regex("ab")
    params = SamplingParams(max_tokens=8, temperature=0, min_tokens=6, structured_output=so)
    out = llm.generate(PROMPT, params)[0]
    assert out.text == "ab" and out.finish_reason == "stop"
    assert llm.get_tokenizer().decode(out.token_ids) == "ab"
    assert_no_leaks(llm)


def test_matchers_advance_on_the_worker_after_the_first_token(llm: LLM) -> None:
    # Only a sequence's first sampled token finds no row the worker filled; every later
    # mask was filled off the step's serial path.
    builder = llm.engine.runner.grammar_masks
    before = builder.late_rows
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, seed=s, ignore_eos=True,
                       structured_output=StructuredOutput.regex("[a-z]{300}"))
        for s in range(3)
    ]  # fmt: skip
    outs = llm.generate([f"{PROMPT} {i}" for i in range(3)], params)
    assert [len(o.token_ids) for o in outs] == [12, 12, 12]
    assert all(re.fullmatch("[a-z]+", o.text) for o in outs)
    assert builder.late_rows - before == 3


def test_a_rejected_token_leaves_its_row_only_the_stop_tokens(llm: LLM) -> None:
    builder = llm.engine.runner.grammar_masks
    so = StructuredOutput.regex("ab")
    seq = llm.engine.requests.prepare(PROMPT, SamplingParams(structured_output=so))
    assert seq.grammar is not None
    seq.token_ids.append(llm.get_tokenizer().encode("z", add_special_tokens=False)[0])
    masks = builder.build([seq], 49152)
    assert masks is not None and masks.rows == [0]
    allowed = ((masks.bitmask[0, :, None] >> torch.arange(32)) & 1).flatten()
    assert torch.nonzero(allowed).flatten().tolist() == sorted(llm.engine.loaded.eos_token_ids)


def test_matchers_accept_before_advance_returns_and_fill_on_the_worker(llm: LLM) -> None:
    # advance: the matcher accepts the new token on the calling (engine) thread; the
    # worker fills the row, and the next build takes it without filling it late.
    builder = llm.engine.runner.grammar_masks
    so = StructuredOutput.regex("ab[0-9]+")
    seq = llm.engine.requests.prepare(PROMPT, SamplingParams(structured_output=so))
    assert seq.grammar is not None
    assert builder.build([seq], 49152) is not None  # the first mask, filled late
    late = builder.late_rows
    fills: list[threading.Thread] = []
    fill = builder._fill

    def recording(*args: Any) -> None:
        fills.append(threading.current_thread())
        fill(*args)

    builder._fill = recording  # type: ignore[method-assign]
    try:
        seq.token_ids.append(llm.get_tokenizer().encode("a", add_special_tokens=False)[0])
        builder.advance([seq])
        assert seq.grammar_accepted == 1 and not seq.grammar.is_terminated()
        masks = builder.build([seq], 49152)
    finally:
        del builder._fill
    assert masks is not None and builder.late_rows == late
    assert len(fills) == 1 and fills[0] is not threading.current_thread()
    allowed = ((masks.bitmask[0, :, None] >> torch.arange(32)) & 1).flatten()
    texts = {llm.get_tokenizer().decode([t]) for t in torch.nonzero(allowed).flatten().tolist()}
    assert "b" in texts and all(text.startswith("b") for text in texts)


@pytest.mark.parametrize("after_schedule", [True, False])
def test_overlapped_steps_give_the_synchronous_outputs(
    tiny_chat_folder: Path, llm: LLM, after_schedule: bool
) -> None:
    # Under the overlap, a step's sampling waits for the previous step's tokens, and (by
    # default) for the next step's scheduling, with a PENDING token appended meanwhile:
    # the masks follow the seen tokens only, and every row but a first token's is filled
    # on the worker. With a small pool, preempted requests resume exactly too.
    specs = [StructuredOutput.json_schema(SCHEMA), None, StructuredOutput.regex("[a-z]{2,40}")]
    params = [
        SamplingParams(max_tokens=40, temperature=0.9, seed=i, structured_output=specs[i % 3])
        for i in range(6)
    ]
    prompts = [f"{PROMPT} number {i} " * 3 for i in range(6)]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    for blocks, preempts in ((64, False), (10, True)):
        overlapped = LLM(
            str(tiny_chat_folder), device="cpu", num_kv_blocks=blocks, max_model_len=160,
            overlap_scheduling="on",
        )  # fmt: skip
        overlapped.engine.sample_after_schedule = after_schedule
        outs = overlapped.generate(prompts, params)
        assert (overlapped.stats()["num_preemptions"] > 0) == preempts
        assert [o.token_ids for o in outs] == expected
        if not preempts:  # a resumed request's next row is filled late too
            assert overlapped.engine.runner.grammar_masks.late_rows == 4  # first tokens
        assert_no_leaks(overlapped)
