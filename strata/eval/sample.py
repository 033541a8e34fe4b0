"""Sample: one generated task instance, and its JSONL form (shared with benchmarks/)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

METRICS = ("all", "part")


@dataclass(frozen=True)
class Sample:
    """One task instance: the prompt in three parts, and what a right answer contains.

    The user turn is `context + question`; `answer_prefix` starts the assistant's reply.
    `context` (instructions and haystack) is what the query-agnostic protocol compresses
    before the question is known. `references` are the strings the answer must contain:
    metric "all" scores the fraction found (RULER's string_match_all), "part" scores 1
    if any is found (string_match_part, RULER's QA metric).
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    metric: str
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if not self.references:
            raise ValueError(f"sample {self.task}/{self.index} has no references")
        object.__setattr__(self, "references", tuple(self.references))


def write_jsonl(samples: Iterable[Sample], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def read_jsonl(path: Path) -> list[Sample]:
    with path.open(encoding="utf-8") as f:
        return [Sample(**json.loads(line)) for line in f if line.strip()]
