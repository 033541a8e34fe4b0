"""Recall pages (strata/kv/recall/page.py, page_decode.py): sequences of one policy,
budget and length share GPU tensors and decode together.

Exact: a page decoding several rows gives each sequence the tokens it gets alone, and
the tokens of pages of one row; rows are handed out first-free and reused with their
state reset; a page's memory is reserved whole and given back with its last row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from strata import SamplingParams
from strata.kv.recall.geometry import RecallGeometry
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.manager import RecallManager
from strata.kv.recall.page_decode import PageDecoder
from tests.test_recall import GREEDY, PROMPT, assert_recall_idle, recall_llm, tokens

KIND = 150  # prompt tokens of every recall request below: one page kind per policy


def prompts(n: int) -> list[list[int]]:
    return [[3 + (i * (37 + 2 * j)) % 500 for i in range(KIND)] for j in range(n)]


def test_a_page_decodes_its_rows_together_as_each_alone(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three quest and two shadowkv requests of one length (two pages) and an ordinary
    one: the batch equals solo runs and runs with pages of one row; the quest page
    decoded three rows at once."""
    most_rows = 0
    decode = PageDecoder.decode

    def counted(self: PageDecoder, s: int, q: Any, k: Any, v: Any, active: Any, *rest: Any) -> Any:
        nonlocal most_rows
        most_rows = max(most_rows, int(active.sum()))
        return decode(self, s, q, k, v, active, *rest)

    monkeypatch.setattr(PageDecoder, "decode", counted)
    quest = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    shadow = SamplingParams(kv_policy="shadowkv", kv_budget=40, **GREEDY)
    params = [quest, shadow, quest, SamplingParams(**GREEDY), shadow, quest]
    batch = prompts(len(params))
    llm = recall_llm(recall_folder)
    solo = [tokens(llm, [p], [sp])[0] for p, sp in zip(batch, params, strict=True)]
    assert most_rows == 1
    assert tokens(llm, batch, params) == solo
    assert most_rows == 3
    assert_recall_idle(llm)
    single = recall_llm(recall_folder, kv_recall_page_rows=1)
    assert tokens(single, batch, params) == solo
    assert_recall_idle(single)


def manager(page_rows: int, gpu_budget: int = 1 << 30) -> RecallManager:
    geometry = RecallGeometry(4, 2, 4, 2, 8, 4, torch.float32)
    store = HostKVStore(256, 2, 2, 4, 8, torch.float32, pin=False)
    return RecallManager(geometry, store, gpu_budget, torch.device("cpu"), page_rows=page_rows)


def test_rows_are_first_free_and_reused_reset() -> None:
    recall = manager(page_rows=2)
    plans = {name: recall.plan_for("quest", 16, 40, 8) for name in "abcd"}
    for waiting, name in zip((3, 2, 1), "abc", strict=True):
        assert recall.admit(name, plans[name], waiting=waiting)
    states = {name: plans[name].state for name in "abc"}
    assert [(s.row, s.page) for s in states.values() if s] == [
        (0, states["a"].page), (1, states["a"].page), (0, states["c"].page),  # type: ignore[union-attr]
    ]  # fmt: skip
    assert states["a"].page is not states["c"].page  # type: ignore[union-attr]
    assert recall.stats()["recall_pages"] == 2 and recall.check_integrity() == []
    a = states["a"]
    assert a is not None and a.working_set is not None
    a.tail_k.fill_(7.0)
    a.working_set.tag.fill_(3)
    recall.release("a")
    assert recall.admit("d", plans["d"])
    d = plans["d"].state
    assert d is not None and d.working_set is not None
    assert (d.page, d.row) == (states["b"].page, 0)  # type: ignore[union-attr]
    assert bool((d.tail_k == 0).all()) and bool((d.working_set.tag == -1).all())
    assert recall.check_integrity() == []
    for name in "bcd":
        recall.release(name)
    assert recall.stats()["recall_pages"] == 0 and recall.gpu_used == 0
    assert recall.check_integrity() == []


def test_a_page_reserves_its_rows_within_the_budget() -> None:
    """page_rows 4, but the GPU budget holds two rows: the page gets two, and a third
    request of the kind waits (admit is False, nothing changes) until one is released."""
    probe = manager(page_rows=1)
    kv = probe.plan_for("quest", 16, 40, 8)
    dense = probe.geometry.dense_bytes(kv.max_tokens)
    row = kv.gpu_bytes - dense
    recall = manager(page_rows=4, gpu_budget=2 * row + 3 * dense)
    plans = [recall.plan_for("quest", 16, 40, 8) for _ in range(3)]
    assert recall.admit("a", plans[0], waiting=3) and recall.admit("b", plans[1], waiting=2)
    state = plans[0].state
    assert state is not None and state.page.capacity == 2
    assert recall.gpu_used == 2 * row + 2 * dense
    free = recall.store.num_free
    assert not recall.admit("c", plans[2]) and plans[2].state is None
    assert recall.store.num_free == free and recall.check_integrity() == []
    recall.release("a")
    assert recall.admit("c", plans[2])
    assert recall.check_integrity() == []


def test_a_new_page_has_rows_for_its_kind_live_or_waiting() -> None:
    """A lone sequence of its kind reserves one row; a page made while three wait has
    three; the next page of the kind has rows for the live ones plus the one waiting."""
    recall = manager(page_rows=8)
    plans = {name: recall.plan_for("quest", 16, 40, 8) for name in "abcde"}
    other = recall.plan_for("quest", 16, 200, 8)  # another room: another kind
    assert recall.admit("lone", other, waiting=1) and other.state is not None
    assert other.state.page.capacity == 1
    for waiting, name in zip((3, 2, 1), "abc", strict=True):
        assert recall.admit(name, plans[name], waiting=waiting)
    first = plans["a"].state
    assert first is not None and first.page.capacity == 3
    assert recall.admit("d", plans["d"], waiting=2)
    assert plans["d"].state is not None and plans["d"].state.page.capacity == 5
    assert recall.check_integrity() == []


def test_page_rows_must_be_positive(recall_folder: Path) -> None:
    with pytest.raises(ValueError, match="kv_recall_page_rows"):
        recall_llm(recall_folder, kv_recall_page_rows=0)


def test_prompts_share_a_page_only_when_of_one_kind(recall_folder: Path) -> None:
    """The room is the host slots of prompt + max_tokens in blocks of 4: 150 and 149
    tokens (+ 24) round to 44 blocks and share a page, 100 tokens gets its own."""
    llm = recall_llm(recall_folder)
    params = SamplingParams(kv_policy="quest", kv_budget=40, **GREEDY)
    engine = llm.engine
    for prompt in (PROMPT, PROMPT[:100], PROMPT[1:]):
        engine.add_request(prompt, params)
    pages = 0
    while engine.has_unfinished():
        engine.step()
        pages = max(pages, int(llm.stats()["recall_pages"]))
    assert pages == 2
    assert_recall_idle(llm)


def test_a_pages_other_decode_rows_join_its_unit(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two quest sequences of one room: A (150-token prompt) selects from its first
    step, B (48 tokens, 126 to generate) attends all its few middle blocks, so for some
    steps it decodes on its own while its page decodes A. A page's decode writes every
    row, so B's work joins the page's unit (one CUDA stream): units holding two pieces
    of work appear, and each sequence still gets its solo tokens."""
    import strata.kv.recall.attention as attention

    joined = 0
    in_turn = attention._in_turn

    def counted(units: list[Any]) -> None:
        nonlocal joined
        joined += len(units) > 1
        in_turn(units)

    monkeypatch.setattr(attention, "_in_turn", counted)
    llm = recall_llm(recall_folder)
    prompts = [PROMPT, PROMPT[:48]]
    params = [
        SamplingParams(kv_policy="quest", kv_budget=40, **{**GREEDY, "max_tokens": n})
        for n in (24, 126)
    ]
    solo = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    joined = 0
    assert tokens(llm, prompts, params) == solo
    assert joined > 0
    assert_recall_idle(llm)


def test_paged_sequences_retire_once_per_run_of_consecutive_layers() -> None:
    """After the step's last layer each page-decoded sequence retires its tails' leaving
    blocks once per run of consecutive sparse layers its page decoded (a layer fitted
    outside the page breaks the run), then nothing is left pending."""
    from types import SimpleNamespace

    from strata.attention.reference import ReferenceAttention
    from strata.kv.recall.attention import RecallAttention

    calls: list[tuple[str, slice]] = []

    def part(name: str) -> Any:
        def retire(layers: slice, chunk: object) -> None:
            calls.append((name, layers))

        return SimpleNamespace(state=SimpleNamespace(retire_after_decode=retire), chunk=None)

    backend = RecallAttention(ReferenceAttention())
    a, b = part("a"), part("b")
    backend._paged = {1: (a, [0, 1, 2, 4, 5]), 2: (b, [3])}
    backend.retire_paged()
    assert calls == [("a", slice(0, 3)), ("a", slice(4, 6)), ("b", slice(3, 4))]
    assert backend._paged == {}
