"""Cross-layer prefetch of recall picks (--kv-recall-prefetch; strata/kv/recall/prefetch.py).

Exact: each layer still attends its own picks, so outputs equal runs without the
prefetch, for every selecting policy (and magicpig beside them, which picks nothing),
alone and in a mixed batch with pages of several rows;
what the prefetch guessed is counted against each layer's picks, by hand here; it moves
bytes of its own and leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from strata import SamplingParams
from strata.kv.recall.page_decode import PageDecoder
from strata.kv.recall.prefetch import LayerPrefetch
from tests.test_recall import GREEDY, PROMPT, assert_recall_idle, recall_llm, tokens


def batch() -> tuple[list[list[int]], list[SamplingParams]]:
    quest, shadow, cluster, pq, pig = (SamplingParams(kv_policy=name, kv_budget=40, **GREEDY)
        for name in ("quest", "shadowkv", "clusterkv", "pqcache", "magicpig"))  # fmt: skip
    prompts = [PROMPT, PROMPT[20:], PROMPT[5:], PROMPT, PROMPT[:140], PROMPT[10:], PROMPT[15:],
               PROMPT[25:]]  # fmt: skip
    return prompts, [quest, shadow, quest, SamplingParams(**GREEDY), shadow, cluster, pq, pig]


def test_prefetch_changes_no_token_and_reports_its_guesses(recall_folder: Path) -> None:
    prompts, params = batch()
    plain = recall_llm(recall_folder)
    expected = tokens(plain, prompts, params)
    assert plain.stats()["recall_prefetch_precision_per_layer"] == {}
    llm = recall_llm(recall_folder, kv_recall_prefetch=True)
    assert tokens(llm, prompts, params) == expected
    stats = llm.stats()
    per_layer = stats["recall_prefetch_precision_per_layer"]
    dense = llm.engine.parts.recall.geometry.dense_layers
    # a sparse layer is guessed from the layer before: every sparse layer but none before
    assert sorted(per_layer) == list(range(dense, 4))
    assert all(0.0 <= p <= 1.0 for p in per_layer.values())
    assert 0.0 < stats["recall_prefetch_precision"] <= 1.0
    assert stats["recall_prefetch_bytes"] > 0
    assert_recall_idle(llm)


@pytest.mark.parametrize("policy", ["quest", "shadowkv", "clusterkv", "pqcache"])
def test_the_guesses_are_counted_against_each_layers_picks(
    recall_folder: Path, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every count the prefetch adds equals a count by hand of the layer's picks found
    among its guesses, for the rows decoding."""
    expected = torch.zeros(2, 4, dtype=torch.long)  # [right, picks] per sparse layer
    count = LayerPrefetch.count

    def by_hand(self: LayerPrefetch, s: int, t: Any) -> None:
        on = self.active[s % 2]
        for row in torch.nonzero(on).flatten().tolist():
            for head, picks in enumerate(self.picked[row].tolist()):
                guessed = set(self.guessed[s % 2, row, head].tolist())
                expected[0, s] += sum(p in guessed for p in picks)
                expected[1, s] += len(picks)
        count(self, s, t)

    monkeypatch.setattr(LayerPrefetch, "count", by_hand)
    llm = recall_llm(recall_folder, kv_recall_prefetch=True)
    params = SamplingParams(kv_policy=policy, kv_budget=40, **GREEDY)
    tokens(llm, [PROMPT, PROMPT[10:]], [params, params])
    stats = llm.stats()
    dense = llm.engine.parts.recall.geometry.dense_layers
    sparse = 4 - dense
    assert int(expected[1, :sparse].sum()) > 0
    assert stats["recall_prefetch_precision_per_layer"] == {
        dense + s: int(expected[0, s]) / int(expected[1, s]) for s in range(sparse)
    }
    assert_recall_idle(llm)


def test_a_layer_waits_for_its_own_guess_only(
    recall_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sparse layer's guess is issued before the layer before decodes, and joined
    just before its own decode: two are in flight at most, one per parity."""
    events: list[tuple[str, int]] = []
    issue, decode = LayerPrefetch.issue, PageDecoder.decode

    def issued(self: LayerPrefetch, s: int, *rest: Any) -> None:
        events.append(("issue", s))
        issue(self, s, *rest)

    def decoded(self: PageDecoder, s: int, *rest: Any) -> Any:
        events.append(("decode", s))
        return decode(self, s, *rest)

    monkeypatch.setattr(LayerPrefetch, "issue", issued)
    monkeypatch.setattr(PageDecoder, "decode", decoded)
    llm = recall_llm(recall_folder, kv_recall_prefetch=True)
    params = SamplingParams(kv_policy="quest", kv_budget=40, **{**GREEDY, "max_tokens": 6})
    tokens(llm, [PROMPT], [params])
    sparse = 4 - llm.engine.parts.recall.geometry.dense_layers
    step = [("issue", 0)] + [
        e for s in range(sparse) for e in ((("issue", s + 1),) if s + 1 < sparse else ())
        + (("decode", s),)
    ]  # fmt: skip
    assert events[-len(step):] == step
    assert_recall_idle(llm)


def test_prefetch_is_refused_under_tensor_parallelism(recall_folder: Path) -> None:
    with pytest.raises(ValueError, match="does not run with kv_recall_prefetch"):
        recall_llm(recall_folder, kv_recall_prefetch=True, tensor_parallel_size=2)
