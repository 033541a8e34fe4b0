"""Whole recall decode steps as graphs (strata/kv/recall/step_graphs.py), on CPU.

A CUDA graph replays the kernels its capture recorded: host values read during the
capture are frozen, device tensors are read afresh. RerunRecorder replays that way on CPU
(the captured Python runs again with the capture step's metadata), so a forward that
leaned on a host value of the step (a position, a length, a tail count) would give wrong
tokens here. Exact: steps from graphs give the eager engine's tokens, for quest and
shadowkv in pages of several rows; a step with an ordinary row, a prefill or a row that
does not select runs eagerly; graphs naming released sequences go; nothing leaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from strata import LLM, SamplingParams
from strata.kv.recall.step_graphs import MAX_GRAPHS, RecallStepGraphs, RerunRecorder
from tests.test_recall import GREEDY, assert_recall_idle, recall_llm, tokens

LENGTH = 150  # every recall prompt below: one page per policy


def prompts(n: int) -> list[list[int]]:
    return [[3 + (i * (41 + 2 * j)) % 500 for i in range(LENGTH)] for j in range(n)]


def with_step_graphs(llm: LLM) -> RecallStepGraphs:
    parts = llm.engine.parts
    assert parts.recall is not None
    runner = parts.runner
    graphs = RecallStepGraphs(
        parts.placed.model, runner.kv, runner.recall_attention, torch.device("cpu"), 8,
        recorder=RerunRecorder(),
    )  # fmt: skip
    parts.recall.release_listeners.append(graphs.forget)
    runner.recall_graphs = graphs
    return graphs


@pytest.mark.parametrize("page_rows", [4, 1])
def test_steps_from_graphs_equal_eager_steps(recall_folder: Path, page_rows: int) -> None:
    """Three quest rows in one page (or a page each), then two shadowkv rows: every decode
    step past the first two selecting ones replays, and the tokens are the eager engine's."""
    for policy, rows in (("quest", 3), ("shadowkv", 2)):
        params = SamplingParams(kv_policy=policy, kv_budget=40, **GREEDY)
        batch = prompts(rows)
        eager = recall_llm(recall_folder, kv_recall_page_rows=page_rows)
        want = tokens(eager, batch, [params] * rows)
        llm = recall_llm(recall_folder, kv_recall_page_rows=page_rows)
        graphs = with_step_graphs(llm)
        assert tokens(llm, batch, [params] * rows) == want
        stats = llm.stats()
        assert graphs.captures == stats["recall_step_graph_captures"] >= 1
        assert stats["recall_step_graph_replays"] == graphs.replays >= 10
        assert stats["recall_step_graphs"] == 0  # its rows were released: dropped
        assert_recall_idle(llm)


def test_steps_a_graph_cannot_run_are_eager(recall_folder: Path) -> None:
    """An ordinary row in every step (it decodes the longest), or budgets covering every
    block (no row selects): no step is captured, and the tokens are the eager engine's."""
    quest = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    whole = SamplingParams(kv_policy="quest", kv_budget=10**6, **GREEDY)
    ordinary = SamplingParams(**{**GREEDY, "max_tokens": 40})
    cases = [[ordinary, quest, quest], [whole, whole]]
    for params in cases:
        batch = prompts(len(params))
        want = tokens(recall_llm(recall_folder), batch, params)
        llm = recall_llm(recall_folder)
        graphs = with_step_graphs(llm)
        assert tokens(llm, batch, params) == want
        assert graphs.captures == 0 and graphs.replays == 0
        assert_recall_idle(llm)


def test_rows_leaving_capture_anew_and_stale_graphs_go(recall_folder: Path) -> None:
    """Rows finishing at different lengths change the step's key: each new composition
    of rows is captured once it repeats, and a capture drops graphs naming released
    sequences. The tokens are the eager engine's."""
    params = [
        SamplingParams(kv_policy="quest", kv_budget=40, **{**GREEDY, "max_tokens": n})
        for n in (30, 18, 24)
    ]
    batch = prompts(3)
    want = tokens(recall_llm(recall_folder), batch, params)
    llm = recall_llm(recall_folder)
    graphs = with_step_graphs(llm)
    assert tokens(llm, batch, params) == want
    assert graphs.captures == 2  # rows (0, 1, 2), then (0, 2); (0,) decodes once, eagerly
    assert graphs.replays > 15
    assert len(graphs._graphs) <= MAX_GRAPHS
    assert_recall_idle(llm)


def test_key_names_rows_in_order(recall_folder: Path) -> None:
    """The key is the rows' serials in flat order, and only a step whose logits rows are
    its rows in order (every row samples) has one."""
    llm = recall_llm(recall_folder)
    graphs = with_step_graphs(llm)
    seen: list[tuple[int, ...] | None] = []
    key_of = graphs.key_of

    def spy(meta, logits_rows):  # type: ignore[no-untyped-def]
        key = key_of(meta, logits_rows)
        seen.append(key)
        if key is not None:
            assert key_of(meta, np.arange(len(key))[::-1].copy()) is None or len(key) == 1
            assert key_of(meta, np.arange(len(key) + 1)) is None
        return key

    graphs.key_of = spy  # type: ignore[method-assign]
    params = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    tokens(llm, prompts(2), [params] * 2)
    keys = [k for k in seen if k is not None]
    assert keys[0] == (0, 1) and set(keys) == {(0, 1), (1,)}  # serials; the second ends last
    assert_recall_idle(llm)


def test_metrics_count_steps_from_graphs(recall_folder: Path) -> None:
    from strata.server.metrics import ServerMetrics

    llm = recall_llm(recall_folder)
    graphs = with_step_graphs(llm)
    params = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    tokens(llm, prompts(2), [params] * 2)
    text = ServerMetrics(llm.stats).render().decode()
    assert f"strata_recall_step_graph_replays_total {float(graphs.replays)}" in text
    assert f"strata_recall_step_graph_captures_total {float(graphs.captures)}" in text
    assert "strata_recall_step_graphs 0.0" in text and graphs.replays > 0


def test_a_step_that_cannot_be_captured_runs_eagerly(
    recall_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture that fails leaves the step, and every later one, to the eager path."""

    class Failing(RerunRecorder):
        def capture(self, forward):  # type: ignore[no-untyped-def]
            raise RuntimeError("operation not permitted when stream is capturing")

    params = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    want = tokens(recall_llm(recall_folder), prompts(2), [params] * 2)
    llm = recall_llm(recall_folder)
    graphs = with_step_graphs(llm)
    graphs.recorder = Failing()
    with caplog.at_level("WARNING", logger="strata.engine"):
        assert tokens(llm, prompts(2), [params] * 2) == want
    assert graphs.replays == 0 and not graphs.enabled and RecallStepGraphs.enabled
    assert "capturing one failed" in caplog.text
    assert_recall_idle(llm)
