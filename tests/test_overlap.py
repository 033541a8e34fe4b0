"""Overlap scheduling (engine/overlap.py) gives the outputs of synchronous steps: greedy,
seeded, penalized, constrained and early-stopping requests, under chunked prefill,
preemption, prefix caching, KV policies and aborts, with no block leaked. On the CPU
the overlap is exercised for its bookkeeping (each launch runs at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strata import LLM, SamplingParams
from strata.config import EngineConfig, ParallelConfig, SchedulerConfig
from strata.engine.overlap import PENDING, sampling_seqs
from strata.engine.structured_output import StructuredOutput
from tests.conftest import assert_no_leaks

PROMPTS = [
    [5, 17, 99, 3, 42, 42, 8, 250, 251, 252, 253, 19],
    [300, 301, 302],
    [7] * 21,
    [5, 17, 99, 3, 42, 42, 8, 250, 251, 252, 11, 12, 13, 14],  # shares a prefix with the first
    [64, 65, 66, 67, 68],
]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=17, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.9, seed=11, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, frequency_penalty=1.2),
        SamplingParams(
            max_tokens=14,
            temperature=0.7,
            top_p=0.8,
            seed=5,
            ignore_eos=True,
            presence_penalty=0.5,
            logit_bias={40: 4.0},
        ),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    ]


def _llm(folder: Path, overlap: str, **engine_args: Any) -> LLM:
    args = {"kv_cache_memory": 0.01, "block_size": 4, **engine_args}
    return LLM(str(folder), device="cpu", overlap_scheduling=overlap, **args)


def _generate(llm: LLM, params: list[SamplingParams]) -> list[tuple[list[int], Any, str | None]]:
    outs = llm.generate(PROMPTS, params)
    assert_no_leaks(llm)
    return [(o.token_ids, o.logprobs, o.finish_reason) for o in outs]


@pytest.fixture(scope="module")
def folder(tiny_models: dict[str, Any]) -> Path:
    return tiny_models["llama"][0]


@pytest.fixture(scope="module")
def reference(folder: Path) -> list[tuple[list[int], Any, str | None]]:
    return _generate(_llm(folder, "off"), _params())


@pytest.mark.parametrize(
    "engine_args",
    [
        {},
        {"max_num_batched_tokens": 5},  # chunked prefill beside decodes
        {"enable_prefix_caching": False},
        {"num_kv_blocks": 14, "max_model_len": 48},  # preemption
        {"enforce_eager": True},
    ],
    ids=["default", "chunked", "no-prefix-cache", "preemption", "eager"],
)
def test_overlapped_outputs_equal_synchronous_ones(
    folder: Path, engine_args: dict[str, Any]
) -> None:
    """Same engine settings, same batches each step: tokens and logprobs equal exactly."""
    expected = _generate(_llm(folder, "off", **engine_args), _params())
    llm = _llm(folder, "on", **engine_args)
    assert llm.engine.overlap
    assert _generate(llm, _params()) == expected
    if "num_kv_blocks" in engine_args:
        assert llm.stats()["num_preemptions"] > 0


def test_a_step_returns_the_previous_steps_tokens(folder: Path) -> None:
    """The tokens of a launched step come out of the next call; none is ever PENDING."""
    llm = _llm(folder, "on")
    engine = llm.engine
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert engine.step() == []  # the prefill is launched, not sampled
    assert engine.step() == []  # ... sampled now, its token on the way; the next launched
    calls = []
    while engine.has_unfinished():
        calls.append([(o.token_ids, o.finished) for o in engine.step()])
    tokens = calls[-1][0][0]
    assert calls == [[(tokens[:1], False)], [(tokens[:2], False)], [(tokens, True)]]
    assert PENDING not in tokens
    assert_no_leaks(llm)


def test_early_stops_drop_the_row_computed_after_them(folder: Path, reference: Any) -> None:
    """A stop token found one step late: the output ends where the synchronous one does."""
    stop = reference[0][0][4]  # the first request's fifth token
    params = _params()
    params[0] = SamplingParams(max_tokens=17, temperature=0, stop_token_ids=[stop])
    params[2] = SamplingParams(max_tokens=23, temperature=0, frequency_penalty=1.2, stop=["xyz"])
    expected = _generate(_llm(folder, "off"), params)
    assert len(expected[0][0]) < 17 and expected[0][2] == "stop"
    got = _generate(_llm(folder, "on"), params)
    # The dropped rows change one step's batch, so float32 logprobs agree to rounding.
    assert [(t, r) for t, _, r in got] == [(t, r) for t, _, r in expected]
    for (_, lp, _), (_, expected_lp, _) in zip(got, expected, strict=True):
        if expected_lp is not None:
            assert [x.token_id for x in lp] == [x.token_id for x in expected_lp]
            assert [x.logprob for x in lp] == pytest.approx([x.logprob for x in expected_lp])


def test_a_stop_found_while_a_synchronous_step_is_built(folder: Path, reference: Any) -> None:
    """A KV-policy request makes every step synchronous; a request whose in-flight token
    stops it is dropped from the step that was launched with it."""
    params = _params()
    params[0] = SamplingParams(max_tokens=17, temperature=0, stop_token_ids=[reference[0][0][4]])
    params[4] = SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, kv_policy="streaming", kv_budget=8
    )
    expected = _generate(_llm(folder, "off", max_num_batched_tokens=5), params)
    llm = _llm(folder, "on", max_num_batched_tokens=5)
    prepare = llm.engine.runner.prepare_sampling
    dropped: list[int] = []

    def spy(plan: Any, logits: Any, keep: Any = None) -> Any:
        if keep is not None:
            dropped.append(len(sampling_seqs(plan)) - len(keep))
        return prepare(plan, logits, keep)

    llm.engine.runner.prepare_sampling = spy  # type: ignore[method-assign]
    got = _generate(llm, params)
    assert [(t, r) for t, _, r in got] == [(t, r) for t, _, r in expected]
    assert got[0][2] == "stop" and len(got[0][0]) == 5
    assert dropped == [1]  # the stopped request's row, launched before its stop was seen


def abort_in_flight(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int) -> None:
    """Two requests; after `steps` engine steps the first is aborted while its token is in
    flight: it ends without a PENDING token, and the second completes its max_tokens."""
    engine = llm.engine
    first, second = (engine.add_request(p, params) for p in prompts[:2])
    for _ in range(steps):
        engine.step()
    assert engine._sampled is not None and engine._launched is not None
    aborted = engine.abort(first)
    assert aborted is not None and aborted.finish_reason == "abort"
    assert PENDING not in aborted.token_ids
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step()})
    assert first not in done and len(done[second].token_ids) == params.max_tokens
    assert_no_leaks(llm)


def test_abort_while_a_token_is_in_flight(folder: Path) -> None:
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    abort_in_flight(_llm(folder, "on"), PROMPTS, params, steps=4)


def test_kv_policy_and_constrained_requests_beside_overlapped_ones(tiny_chat_folder: Path) -> None:
    """A KV-policy request runs its steps synchronously, behind the overlapped requests'
    tokens (fed on the device); constrained rows get masks from every earlier token."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    so = StructuredOutput.json_schema(schema)
    prompts = ["Give me a number:", "Count to ten:", "Say something long about the sea"]
    params = [
        SamplingParams(max_tokens=20, temperature=0.8, seed=4, structured_output=so),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True, kv_policy="streaming", kv_budget=8
        ),
    ]

    def run(overlap: str) -> list[list[int]]:
        llm = LLM(str(tiny_chat_folder), device="cpu", kv_cache_memory=0.02,
                  max_model_len=512, overlap_scheduling=overlap)  # fmt: skip
        outs = llm.generate(prompts, params)
        assert_no_leaks(llm)
        return [o.token_ids for o in outs]

    assert run("on") == run("off")


def test_overlap_setting() -> None:
    assert SchedulerConfig().overlap == "auto"
    with pytest.raises(ValueError, match="overlap_scheduling must be one of auto, on, off"):
        SchedulerConfig(overlap="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overlap_scheduling on"):
        EngineConfig(
            scheduler=SchedulerConfig(overlap="on"),
            parallel=ParallelConfig(tensor_parallel_size=2),
        )


def test_final_only_requests_get_their_finished_output_alone(folder: Path) -> None:
    """Offline generate wants finished outputs only: no output object per step."""
    llm = _llm(folder, "off")
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    quiet = engine.prepare(PROMPTS[0], params)
    quiet.final_only = True
    engine.enqueue(quiet)
    loud = engine.add_request(PROMPTS[1], params)
    seen: dict[str, list[bool]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out.finished)
    assert seen[quiet.request_id] == [True]
    assert seen[loud] == [False] * 5 + [True]
    assert_no_leaks(llm)
