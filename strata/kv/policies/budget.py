"""The KV budget: a fraction of the compressible context if < 1, a token count if >= 1."""

from __future__ import annotations

import math


def check_budget(budget: float) -> None:
    """Raise ValueError unless `budget` is a fraction in (0, 1) or a whole number >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"kv_budget must be a number, got {budget!r}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(
            f"kv_budget must be a fraction of the context in (0, 1) or a whole number of "
            f"tokens >= 1; got {budget}"
        )
    if budget >= 1 and budget != int(budget):
        raise ValueError(
            f"kv_budget >= 1 is a number of tokens and must be whole; got {budget} "
            "(use a value below 1 for a fraction of the context)"
        )


def tokens_allowed(budget: float, context_len: int) -> int:
    """The budget in tokens for a `context_len`-token context (at least 1)."""
    return max(1, int(context_len * budget) if budget < 1 else int(budget))


def tokens_kept(budget: float, context_len: int) -> int:
    """Tokens of a `context_len`-token context that a budget keeps: at least 1, at most all."""
    return min(tokens_allowed(budget, context_len), context_len)
