"""The RULER-style task registry and the seeded, length-fitted sample generator."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

from strata.eval.fitting import largest_fitting
from strata.eval.niah import NIAH_SPECS, build_niah
from strata.eval.prompt import prompt_ids, template_parts
from strata.eval.sample import Sample
from strata.eval.variable_tracking import build_variable_tracking
from strata.eval.word_extraction import build_common_words, build_frequent_words, common_freq

# build(seed, index, size): a sample whose haystack has `size` units
Builder = Callable[[int, int, int], Sample]
# name -> the task's builder for a given length
def _niah(name: str) -> Callable[[int], Builder]:
    return lambda _: partial(build_niah, name)


TASKS: dict[str, Callable[[int], Builder]] = {
    **{name: _niah(name) for name in NIAH_SPECS},
    "vt": lambda _: build_variable_tracking,
    "cwe": lambda length: partial(build_common_words, freq=common_freq(length)),
    "fwe": lambda _: build_frequent_words,
}


def parse_tasks(spec: str) -> list[str]:
    """ "all" or a comma-separated list of task names."""
    if spec == "all":
        return list(TASKS)
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or spec!r}; valid: all, {', '.join(TASKS)}")
    return names


def sample_seed(seed: int, task: str, index: int) -> int:
    """A stable per-sample seed (crc32, not hash(): the same in every process)."""
    return zlib.crc32(f"{seed}/{task}/{index}".encode())


def generate_samples(
    tokenizer: Any, task: str, length: int, num_samples: int, seed: int = 0
) -> list[Sample]:
    """`num_samples` samples of `task` whose prompt plus answer budget fit `length` tokens.

    Each sample's haystack is the largest that fits: prompt tokens (chat template
    included) + max_new_tokens <= length, as RULER sizes its samples.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    parts = template_parts(tokenizer)
    build = TASKS[task](length)

    def fits(sample: Sample) -> bool:
        return len(prompt_ids(tokenizer, sample, parts)) + sample.max_new_tokens <= length

    return [
        largest_fitting(partial(build, sample_seed(seed, task, i), i), fits)
        for i in range(num_samples)
    ]
