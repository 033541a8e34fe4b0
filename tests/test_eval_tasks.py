"""The RULER-style harness: every task scores a right answer 1 and a wrong one 0, samples
are deterministic for a seed and fit the length, and the prompt splits for both protocols."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from strata.eval.prompt import prompt_ids
from strata.eval.sample import Sample, read_jsonl, write_jsonl
from strata.eval.scoring import score, string_match_all, string_match_part
from strata.eval.settings import Setting, parse_budgets
from strata.eval.tasks import TASKS, generate_samples, parse_tasks

LENGTH = 1024


@pytest.fixture(scope="module")
def tokenizer(embedded_folder: Path) -> Any:
    return AutoTokenizer.from_pretrained(embedded_folder)


@pytest.fixture(scope="module")
def samples(tokenizer: Any) -> dict[str, list[Sample]]:
    return {t: generate_samples(tokenizer, t, LENGTH, 2, seed=7) for t in TASKS}


@pytest.mark.parametrize("task", list(TASKS))
def test_right_answer_scores_one_and_wrong_answer_zero(
    samples: dict[str, list[Sample]], task: str
) -> None:
    for s in samples[task]:
        right = "Sure. " + ", ".join(r.upper() for r in reversed(s.references)) + "."
        assert score(s, right) == 1.0
        assert score(s, "I could not find anything in the text.") == 0.0
        if len(s.references) > 1:  # string_match_all gives partial credit
            assert score(s, s.references[0]) == pytest.approx(1 / len(s.references))


def test_string_match_part_is_all_or_nothing() -> None:
    refs = ("Paris", "the capital")
    assert string_match_part("it is paris", refs) == 1.0
    assert string_match_part("it is Lyon", refs) == 0.0
    assert string_match_all("it is paris", refs) == 0.5
    assert string_match_all("the capital,\nParis", refs) == 1.0


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_fit_the_length_and_hold_their_answers(
    tokenizer: Any, samples: dict[str, list[Sample]], task: str
) -> None:
    for s in samples[task]:
        ids = prompt_ids(tokenizer, s)
        assert len(ids) + s.max_new_tokens <= LENGTH
        assert len(ids) + s.max_new_tokens > LENGTH * 0.85  # the haystack was grown to fit
        assert ids.all == ids.context + ids.question + ids.suffix
        assert ids.compressible("query-agnostic") == len(ids.context)
        assert ids.compressible("question-cut") == len(ids.context) + len(ids.question)
        assert ids.compressible("query-aware") == len(ids.all)
        if task.startswith("niah") or task == "vt":
            assert all(r in s.context for r in s.references)  # the needles are in the context
            assert not any(r in s.question for r in s.references if task != "vt")


def test_generation_is_deterministic_for_a_seed(
    tokenizer: Any, samples: dict[str, list[Sample]]
) -> None:
    for task in TASKS:
        again = generate_samples(tokenizer, task, LENGTH, 2, seed=7)
        assert again == samples[task]
        other = generate_samples(tokenizer, task, LENGTH, 1, seed=8)
        assert other[0].context != samples[task][0].context
        assert samples[task][0].context != samples[task][1].context


def test_samples_round_trip_through_jsonl(samples: dict[str, list[Sample]], tmp_path: Path) -> None:
    flat = [s for ss in samples.values() for s in ss]
    write_jsonl(flat, tmp_path / "s.jsonl")
    assert read_jsonl(tmp_path / "s.jsonl") == flat


def test_bad_inputs_are_clear_errors(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("niah,vt")
    with pytest.raises(ValueError, match="too short"):
        generate_samples(tokenizer, "cwe", 200, 1)
    with pytest.raises(ValueError, match="kv_budget"):
        parse_budgets("1,0,0.5")
    with pytest.raises(ValueError, match="protocol"):
        Setting("snapkv", 0.5, "query-blind")
    with pytest.raises(ValueError, match="unknown kv_policy"):
        Setting("lru", 0.5)
    with pytest.raises(ValueError, match="metric"):
        replace(Sample("t", 0, "c", "q", "a", ("x",), "all", 4), metric="bleu")
    assert Setting("snapkv", 1).is_full and Setting("full", 0.5).is_full
