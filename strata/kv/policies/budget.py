"""The KV budget: a fraction of the compressible context if < 1, a token count if >= 1."""

from __future__ import annotations

from strata.config import check_budget

__all__ = ["check_budget", "tokens_allowed", "tokens_kept"]


def tokens_allowed(budget: float, context_len: int) -> int:
    """The budget in tokens for a `context_len`-token context (at least 1)."""
    return max(1, int(context_len * budget) if budget < 1 else int(budget))


def tokens_kept(budget: float, context_len: int) -> int:
    """Tokens of a `context_len`-token context that a budget keeps: at least 1, at most all."""
    return min(tokens_allowed(budget, context_len), context_len)
