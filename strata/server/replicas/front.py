"""Front: what the HTTP front knows of the replicas, and the routing decision.

Per replica it keeps the requests in flight (counted here, exact), its KV use and its
prefix-index keys (both from the replica's reports: `refresh`). Reports of one replica
are fetched one at a time, so its index events are applied in the order it made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from strata.server.config import ServeConfig
from strata.server.replicas.block_index import BlockIndex
from strata.server.replicas.prompt_keys import PromptKeys
from strata.server.replicas.routers import ROUTERS, Candidate, Decision

logger = logging.getLogger("strata.server")

POLL_S = 0.25  # how often every replica's index events and load are fetched
# A report is a dict copy: one that takes longer means the replica is gone (Serve's handle
# holds calls to a dead replica until its successor is up, so they do not fail).
REPORT_TIMEOUT_S = 2.0
# A replica's metrics text for the front's /metrics: one that takes longer is left out.
METRICS_TIMEOUT_S = 2.0


class NoReplicaError(Exception):
    """Every replica was tried, or none is up."""


class RouterMetrics:
    """`prefix` names the pool: strata_router_* for the routed (decode) replicas,
    strata_prefill_router_* for the prefill replicas of a disaggregated front."""

    def __init__(self, router: str, prefix: str = "strata_router") -> None:
        self.registry = CollectorRegistry()
        self.router = router
        self.decisions = Counter(
            f"{prefix}_decisions", "Requests routed, by router, reason and replica.",
            ["router", "reason", "replica"], registry=self.registry,
        )  # fmt: skip
        self.prompt_blocks = Counter(
            f"{prefix}_prompt_blocks", "Reusable prompt blocks of routed requests.",
            registry=self.registry,
        )  # fmt: skip
        self.prefix_blocks = Counter(
            f"{prefix}_prefix_blocks", "Of those, blocks the chosen replica held.",
            registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            f"{prefix}_retries", "Requests sent again after their replica failed before "
            "streaming a token.", registry=self.registry,
        )  # fmt: skip
        self.cut_streams = Counter(
            f"{prefix}_cut_streams", "Streams cut by a replica failure after a token.",
            registry=self.registry,
        )  # fmt: skip


class Front:
    def __init__(
        self, handles: Sequence[Any], config: ServeConfig, model_name: str,
        role: str = "replica", metrics: RouterMetrics | None = None,
    ) -> None:  # fmt: skip
        self.handles = list(handles)
        self.config = config
        self.model_name = model_name
        self.role = role  # replica i is deployment f"{role}-{i}"
        n = len(self.handles)
        self.router = ROUTERS.get(config.router)()
        self.index = BlockIndex(n)
        self.in_flight = [0] * n
        self.kv_use = [0.0] * n
        self.up = [True] * n  # the last report arrived
        self.prompt_keys: PromptKeys | None = None
        self.metrics = metrics or RouterMetrics(config.router)
        self._locks: list[asyncio.Lock] = []
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Fetch the tokenizer and key root from replica 0, then poll every replica."""
        info = await self.handles[0].info.remote()
        self.prompt_keys = PromptKeys(
            info["tokenizer"], self.model_name, info["root"], info["block_size"],
            tuple(self.config.api_keys), self.config.allow_special_tokens_in_content,
        )  # fmt: skip
        self._locks = [asyncio.Lock() for _ in self.handles]
        await self.sync()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def refresh(self, replica: int) -> None:
        async with self._locks[replica]:
            response = self.handles[replica].report.remote()
            try:
                report = await asyncio.wait_for(response, REPORT_TIMEOUT_S)
            except Exception as exc:  # a dead replica: Serve restarts it
                response.cancel()
                if self.up[replica]:
                    logger.warning("%s-%d does not answer: %s", self.role, replica, exc)
                self.up[replica] = False
                return
            self.index.apply(replica, report["incarnation"], report["events"])
            self.kv_use[replica] = report["kv_use"]
            self.up[replica] = True

    async def sync(self) -> None:
        """Bring every replica's keys and load up to date (all events made so far)."""
        await asyncio.gather(*(self.refresh(i) for i in range(len(self.handles))))

    async def replica_metrics(self) -> dict[str, str | None]:
        """Each replica's own metrics text by name, f"{role}-{i}"; None for one that is down
        or does not answer within METRICS_TIMEOUT_S (all are asked at once)."""
        texts = await asyncio.gather(*(self._metrics(i) for i in range(len(self.handles))))
        return {f"{self.role}-{i}": text for i, text in enumerate(texts)}

    async def _metrics(self, replica: int) -> str | None:
        if not self.up[replica]:  # its last report timed out: do not wait on it again
            return None
        response = self.handles[replica].metrics.remote()
        try:
            return str(await asyncio.wait_for(response, METRICS_TIMEOUT_S))
        except Exception as exc:
            response.cancel()
            logger.warning("%s-%d: no metrics: %s", self.role, replica, exc)
            return None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.sync()

    def choose(self, keys: Sequence[bytes], exclude: set[int]) -> Decision:
        """The replica for a prompt with these block keys, none of `exclude`."""
        ids = [i for i in range(len(self.handles)) if i not in exclude]
        live = [i for i in ids if self.up[i]] or ids  # a down one may be back: try it last
        if not live:
            raise NoReplicaError("no replica could take the request")
        candidates = [
            Candidate(i, self.in_flight[i], self.kv_use[i], self.index.prefix_blocks(i, keys))
            for i in live
        ]
        decision = self.router.choose(candidates, len(keys))
        held = next(c.prefix_blocks for c in candidates if c.replica == decision.replica)
        self.metrics.decisions.labels(
            self.config.router, decision.reason, f"{self.role}-{decision.replica}"
        ).inc()
        self.metrics.prompt_blocks.inc(len(keys))
        self.metrics.prefix_blocks.inc(held)
        return decision
