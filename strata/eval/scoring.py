"""RULER's scoring: string_match_all and string_match_part, in [0, 1]."""

from __future__ import annotations

import re

from strata.eval.sample import Sample


def clean_prediction(text: str) -> str:
    """RULER's post-processing: drop control characters, collapse whitespace, strip."""
    return re.sub(r"\s+", " ", re.sub(r"[\x00-\x1f]", "\n", text)).strip()


def string_match_all(prediction: str, references: tuple[str, ...]) -> float:
    """Fraction of references found in the prediction, case-insensitive."""
    pred = clean_prediction(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: tuple[str, ...]) -> float:
    """1.0 if any reference is found in the prediction, case-insensitive; else 0.0."""
    pred = clean_prediction(prediction).lower()
    return float(any(r.lower() in pred for r in references))


def score(sample: Sample, prediction: str) -> float:
    if sample.metric == "all":
        return string_match_all(prediction, sample.references)
    return string_match_part(prediction, sample.references)
