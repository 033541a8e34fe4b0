"""Recall sequences under overlap scheduling (LLMEngine.overlap_recall; engine/overlap.py):
their steps launch before the previous step's tokens reach the host, and give the
outputs of synchronous steps: quest, shadowkv and full_offload beside an ordinary request,
whole-step graphs on (replayed as on CPU: step_graphs.RerunRecorder), a stop found a step
late, and an abort while a token is in flight; no block, host slot or row leaks. On the
CPU the overlap is exercised for its bookkeeping (each launch runs at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strata import LLM, SamplingParams
from strata.engine.engine import LLMEngine
from tests.test_overlap import abort_in_flight
from tests.test_recall import assert_recall_idle, recall_llm
from tests.test_recall_step_graphs import with_step_graphs

GREEDY = {"temperature": 0.0, "max_tokens": 30, "ignore_eos": True}


def prompts(n: int) -> list[list[int]]:
    return [[3 + (i * (41 + 2 * j)) % 500 for i in range(150 + 7 * j)] for j in range(n)]


def params(stop: int | None = None) -> list[SamplingParams]:
    first = {**GREEDY, "ignore_eos": False, "stop_token_ids": [stop]} if stop else GREEDY
    return [
        SamplingParams(kv_policy="quest", kv_budget=40, **first),
        SamplingParams(kv_policy="shadowkv", kv_budget=40, **GREEDY),
        SamplingParams(**GREEDY),
        SamplingParams(kv_policy="quest", kv_budget=40, **{**GREEDY, "max_tokens": 12}),
        SamplingParams(kv_policy="full_offload", kv_budget=1, **GREEDY),
    ]


def run(folder: Path, overlap: str, sampling: list[SamplingParams]) -> tuple[Any, int, int]:
    """The outputs, how many steps with recall rows were launched overlapped, and how many
    whole steps replayed from graphs."""
    llm = recall_llm(folder, overlap_scheduling=overlap)
    graphs = with_step_graphs(llm)
    engine = llm.engine
    overlapped = 0
    decide = engine._overlaps

    def counted(plan: Any) -> bool:
        nonlocal overlapped
        yes = decide(plan)
        overlapped += yes and any(c.seq.recall is not None for c in plan.chunks)
        return yes

    engine._overlaps = counted  # type: ignore[method-assign]
    outs = llm.generate(prompts(len(sampling)), sampling)
    llm.check_integrity()
    assert_recall_idle(llm)
    return [(o.token_ids, o.finish_reason) for o in outs], overlapped, graphs.replays


@pytest.fixture
def overlap_recall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LLMEngine, "overlap_recall", True)


def test_overlapped_recall_steps_equal_synchronous_ones(
    recall_folder: Path, overlap_recall: None
) -> None:
    expected, _, _ = run(recall_folder, "off", params())
    got, overlapped, _ = run(recall_folder, "on", params())
    assert got == expected and overlapped > 20


def test_overlapped_steps_from_graphs_equal_synchronous_ones(
    recall_folder: Path, overlap_recall: None
) -> None:
    """Quest rows of one page ending at different lengths: whole steps replay from graphs,
    and a graph is dropped (its sequence released) while the step after it is in flight."""
    quest = [
        SamplingParams(kv_policy="quest", kv_budget=40, **{**GREEDY, "max_tokens": n})
        for n in (30, 18, 24)
    ]
    expected, _, _ = run(recall_folder, "off", quest)
    got, overlapped, replays = run(recall_folder, "on", quest)
    assert got == expected and overlapped > 20 and replays > 15


def test_a_stop_found_a_step_late_ends_where_it_does_synchronously(
    recall_folder: Path, overlap_recall: None
) -> None:
    reference, _, _ = run(recall_folder, "off", params())
    stop = reference[0][0][6]  # the quest request's seventh token
    expected, _, _ = run(recall_folder, "off", params(stop))
    assert expected[0][1] == "stop" and len(expected[0][0]) < 30
    got, overlapped, _ = run(recall_folder, "on", params(stop))
    assert got == expected and overlapped > 0


def test_without_overlap_recall_recall_steps_stay_synchronous(recall_folder: Path) -> None:
    got, overlapped, _ = run(recall_folder, "on", params())
    assert overlapped == 0 and got == run(recall_folder, "off", params())[0]


def test_abort_of_a_recall_request_with_a_token_in_flight(
    recall_folder: Path, overlap_recall: None
) -> None:
    llm: LLM = recall_llm(recall_folder, overlap_scheduling="on")
    quest = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    abort_in_flight(llm, prompts(2), quest, steps=14)  # both prefilled, then decoding
    llm.check_integrity()
    assert_recall_idle(llm)
