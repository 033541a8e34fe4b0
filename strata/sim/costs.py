"""StepCost: seconds of one engine step, fitted from a real replica's measured steps.

    seconds = base + per_token * tokens + per_row * rows
              + per_prefill_pair * prefill_pairs + per_decode_pair * decode_pairs

tokens: query tokens the step computes (prefill chunks and decodes alike); rows: rows
through the LM head and sampler (one per decode, one per prefill that ends in the step);
pairs: (query token, key) pairs attended, causal, as StepStats counts them, split between
prefill chunks (a chunk of n new tokens after c cached ones: n*c + n(n+1)/2) and decodes
(a decode at context c: c + 1, its KV read once). The two kinds cost differently per pair:
a prefill chunk's attention is a dense matmul, a decode's a gather of its paged KV.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("base_s", "per_token_s", "per_row_s", "per_prefill_pair_s", "per_decode_pair_s")


def chunk_pairs(start: int, end: int) -> int:
    """Attended pairs of a chunk computing tokens start..end-1 (keys 0..t for token t)."""
    return (start + 1 + end) * (end - start) // 2


@dataclass(frozen=True)
class StepWork:
    tokens: int
    rows: int
    prefill_pairs: int
    decode_pairs: int

    def features(self) -> list[float]:
        return [1.0, self.tokens, self.rows, self.prefill_pairs, self.decode_pairs]


@dataclass(frozen=True)
class StepCost:
    base_s: float
    per_token_s: float
    per_row_s: float
    per_prefill_pair_s: float
    per_decode_pair_s: float
    note: str = ""  # what was measured, where
    fit: dict[str, Any] = field(default_factory=dict)  # residuals etc., kept with the JSON

    def __post_init__(self) -> None:
        for name in FEATURES:
            value = getattr(self, name)
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"StepCost.{name} must be a finite number >= 0, got {value}")

    def seconds(self, work: StepWork) -> float:
        if work.tokens <= 0:
            return 0.0
        coef = [getattr(self, name) for name in FEATURES]
        return float(sum(c * f for c, f in zip(coef, work.features(), strict=True)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepCost:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class StepSample:
    work: StepWork
    seconds: float


def _medians(samples: Sequence[StepSample]) -> list[StepSample]:
    """One sample per kind of step: steps of the same tokens and rows, and pairs within
    the same 1/8 octave, become their median (a shared machine's hiccups drop out)."""
    groups: dict[tuple[int, ...], list[StepSample]] = {}
    for s in samples:
        w = s.work
        octaves = (int(np.log2(w.prefill_pairs + 1) * 8), int(np.log2(w.decode_pairs + 1) * 8))
        groups.setdefault((w.tokens, w.rows, *octaves), []).append(s)
    return [
        StepSample(
            StepWork(
                g[0].work.tokens, g[0].work.rows,
                int(np.median([s.work.prefill_pairs for s in g])),
                int(np.median([s.work.decode_pairs for s in g])),
            ),
            float(np.median([s.seconds for s in g])),
        )
        for g in groups.values()
    ]  # fmt: skip


def fit_step_cost(samples: Sequence[StepSample], note: str = "") -> StepCost:
    """Least squares over the median of each kind of step, relative error weighted (each
    counts alike, whether 20 ms or 2 s). A coefficient that comes out negative is dropped
    (held at 0) and the rest fitted again, so every term adds time."""
    kinds = _medians(samples)
    if len(kinds) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} kinds of step, got {len(kinds)}")
    x = np.array([s.work.features() for s in kinds])
    y = np.array([s.seconds for s in kinds])
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
    relative = np.abs(x @ coef - y) / y
    stats = {
        "samples": len(samples), "kinds": len(kinds),
        "mean_abs_rel_error": float(relative.mean()), "max_abs_rel_error": float(relative.max()),
    }  # fmt: skip
    values = dict(zip(FEATURES, (float(c) for c in coef), strict=True))
    return StepCost(**values, note=note, fit=stats)
