"""Fit `strata bench tiers`' workloads to the model's context.

A random-weight model (random:PRESET or random:CONFIG.json) gets a position table long
enough for the longest prompt plus its answer: speed does not depend on weight values,
and the presets' tables are those of the real models (llama-3-8b: 8192 positions). A
model with real weights keeps its table, and document lengths that do not fit are cut to
the longest that does. Either change is said in the bench's output.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fitted:
    """The model spec and QA lengths to run with, and what was changed (empty: nothing);
    `temp_dir` holds a raised model's config, for the caller to remove after the run."""

    model: str | None
    lengths: tuple[int, ...]
    notes: tuple[str, ...] = ()
    temp_dir: str | None = None


def context_limit(config: dict[str, Any]) -> int:
    """The engine's limit (ModelConfig.context_limit) from a transformers config dict."""
    limit = int(config["max_position_embeddings"])
    window = config.get("sliding_window")
    return min(limit, int(window)) if window else limit


def fit_model(
    model: str | None, config: dict[str, Any], lengths: tuple[int, ...], extra: int, needed: int
) -> Fitted:
    """`extra`: tokens a QA prompt adds to its document, plus its answer; `needed`: the
    longest sequence of any workload (QA or chat)."""
    limit = context_limit(config)
    if needed <= limit:
        return Fitted(model, lengths)
    if model is not None and model.startswith("random:"):
        raised = dict(config, max_position_embeddings=needed)
        if config.get("sliding_window"):
            raised["sliding_window"] = max(needed, int(config["sliding_window"]))
        note = (
            f"random weights: the model's position table is raised from {limit} to {needed} "
            "tokens for the longest prompt plus its answer"
        )
        path = _write_config(raised)
        return Fitted(f"random:{path}", lengths, (note,), str(Path(path).parent))
    fit = limit - extra
    if fit < 1:
        raise ValueError(f"the model's context ({limit} tokens) holds no QA document")
    cut = tuple(dict.fromkeys(min(n, fit) for n in lengths))
    note = (
        f"the model's context holds {limit} tokens: document lengths "
        f"{' '.join(map(str, lengths))} are run as {' '.join(map(str, cut))}"
    )
    return Fitted(model, cut, (note,))


def _write_config(config: dict[str, Any]) -> str:
    path = Path(tempfile.mkdtemp(prefix="strata-bt-model-")) / "config.json"
    path.write_text(json.dumps(config))
    return str(path)
