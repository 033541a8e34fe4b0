"""StepCost: seconds of one engine step, fitted from a real replica's measured steps.

    seconds = base + per_token * tokens + per_row * rows + per_pair * pairs

tokens: query tokens the step computes (prefill chunks and decodes alike); rows: rows
through the LM head and sampler (one per decode, one per prefill that ends in the step);
pairs: (query token, key) pairs attended, causal, as StepStats counts them. A decode of a
sequence at context c is one token, one row and c pairs; a prefill of n tokens is n
tokens, one row and n(n+1)/2 pairs. The same three counts come from the engine's step
log (strata/engine/step_stats.py), so a fit and a simulated step measure the same work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("base", "per_token", "per_row", "per_pair")


def chunk_pairs(start: int, end: int) -> int:
    """Attended pairs of a chunk computing tokens start..end-1 (keys 0..t for token t)."""
    return (start + 1 + end) * (end - start) // 2


@dataclass(frozen=True)
class StepCost:
    base_s: float
    per_token_s: float
    per_row_s: float
    per_pair_s: float
    note: str = ""  # what was measured, where
    fit: dict[str, Any] = field(default_factory=dict)  # residuals etc., kept with the JSON

    def __post_init__(self) -> None:
        for name in ("base_s", "per_token_s", "per_row_s", "per_pair_s"):
            value = getattr(self, name)
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"StepCost.{name} must be a finite number >= 0, got {value}")

    def seconds(self, tokens: int, rows: int, pairs: int) -> float:
        if tokens <= 0:
            return 0.0
        return (
            self.base_s + self.per_token_s * tokens + self.per_row_s * rows
            + self.per_pair_s * pairs
        )  # fmt: skip

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepCost:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class StepSample:
    tokens: int
    rows: int
    pairs: int
    seconds: float


def fit_step_cost(samples: Sequence[StepSample], note: str = "") -> StepCost:
    """Least squares over the samples, relative error weighted (each step counts alike,
    whether 20 ms or 2 s). A coefficient that comes out negative is dropped (held at 0)
    and the rest fitted again, so every term adds time."""
    if len(samples) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} step samples, got {len(samples)}")
    x = np.array([[1.0, s.tokens, s.rows, s.pairs] for s in samples])
    y = np.array([s.seconds for s in samples])
    weight = 1.0 / y
    active = list(range(len(FEATURES)))
    coef = np.zeros(len(FEATURES))
    while active:
        solved, *_ = np.linalg.lstsq(x[:, active] * weight[:, None], y * weight, rcond=None)
        if (solved >= 0).all():
            coef[:] = 0.0
            coef[active] = solved
            break
        active.pop(int(np.argmin(solved)))
    predicted = x @ coef
    relative = np.abs(predicted - y) / y
    stats = {
        "samples": len(samples), "mean_abs_rel_error": float(relative.mean()),
        "max_abs_rel_error": float(relative.max()),
    }  # fmt: skip
    base, per_token, per_row, per_pair = (float(c) for c in coef)
    return StepCost(base, per_token, per_row, per_pair, note=note, fit=stats)
