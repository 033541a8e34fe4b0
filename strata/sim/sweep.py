"""Sweeps: routers and prefill/decode ratios at several replica counts, one workload shape
scaled with the cluster (sessions and arrival rate per replica stay fixed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from strata.sim.cluster import Simulator
from strata.sim.config import SimConfig
from strata.sim.costs import StepCost
from strata.sim.report import summarize
from strata.sim.workloads import ChatWorkload


@dataclass(frozen=True)
class SweepPoint:
    replicas: int
    router: str
    pd_ratio: tuple[int, int] | None  # None: colocated

    def config(self, base: SimConfig) -> SimConfig:
        prefill = 0
        if self.pd_ratio is not None:
            p, d = self.pd_ratio
            prefill = min(self.replicas - 1, max(1, round(self.replicas * p / (p + d))))
        return replace(base, replicas=self.replicas, router=self.router, prefill_replicas=prefill)


def sweep_points(
    sizes: Sequence[int], routers: Sequence[str], pd_ratios: Sequence[tuple[int, int]],
    pd_router: str,
) -> list[SweepPoint]:  # fmt: skip
    """Every router colocated at every size, then every P:D ratio (routed by pd_router)."""
    points = [SweepPoint(n, r, None) for n in sizes for r in routers]
    points += [SweepPoint(n, pd_router, ratio) for n in sizes for ratio in pd_ratios]
    return points


def run_sweep(
    points: Sequence[SweepPoint], base: SimConfig, cost: StepCost, per_replica: ChatWorkload,
    seed: int, show_progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """One simulation per point: `per_replica`'s sessions, rate and system prompts times
    the replica count (the same seed: every point of a size sees the same requests)."""
    rows = []
    total = sum(per_replica.sessions * per_replica.turns * p.replicas for p in points)
    with tqdm(total=total, unit="req", desc="simulating", disable=not show_progress) as bar:
        for point in points:
            n = point.replicas
            workload = replace(
                per_replica, sessions=per_replica.sessions * n, rate=per_replica.rate * n,
                systems=per_replica.systems * n,
            )  # fmt: skip
            config = point.config(base)
            bar.set_postfix_str(f"{n} replicas, {point.router}, {config.pd_label}")
            result = Simulator(config, cost).run(workload.requests(seed, config.block_size),
                                                 bar.update)  # fmt: skip
            row = summarize(result)
            row["pd_ratio"] = "-" if point.pd_ratio is None else "{}:{}".format(*point.pd_ratio)
            rows.append(row)
    return rows
