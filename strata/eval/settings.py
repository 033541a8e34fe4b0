"""What one evaluation run measures: policy, budget, protocol (shared by Strata and kvpress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from strata.kv.policies.budget import check_budget
from strata.kv.policies.registry import FULL, check_policy_name

Protocol = Literal["query-aware", "query-agnostic", "question-cut"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
MAIN_PROTOCOLS = PROTOCOLS[:2]  # "both" on the command line


@dataclass(frozen=True)
class Setting:
    """One point of a sweep.

    budget: the KV kept, a fraction of the compressed context if < 1, a token count if
    > 1; exactly 1 means the whole context, i.e. the `full` policy (so that a sweep
    `1,0.5,0.25` starts at the uncompressed reference).
    """

    policy: str
    budget: float
    protocol: str = "query-aware"

    def __post_init__(self) -> None:
        check_policy_name(self.policy)
        check_budget(self.budget)
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )

    @property
    def is_full(self) -> bool:
        return self.policy == FULL or self.budget == 1

    @property
    def label(self) -> str:
        if self.is_full:
            return "full"
        return f"{self.policy}@{self.budget:g}/{self.protocol}"


def parse_budgets(spec: str) -> list[float]:
    """ "0.125" or a comma-separated sweep "1,0.5,0.25"; each checked."""
    try:
        budgets = [float(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budget must be numbers separated by commas, got {spec!r}") from None
    if not budgets:
        raise ValueError("--budget needs at least one value")
    for b in budgets:
        check_budget(b)
    return budgets
