"""PrefillStage: the first half of disaggregated serving (--prefill-replicas P
--decode-replicas D), run by the front before it relays a request to a decode replica.

    front: prompt ─► prefill-j (the router, over the prefill pool) ─► its full blocks
             │        computes the prompt, waits until they are in ─► the shared tier
             └─► relay ─► replica-i (decode): its remote probe finds the blocks, it
                          loads them and computes only the tail, then generates

The KV travels as the tiers' own blocks under the same content keys, so a decode replica
needs nothing new: a prompt it finds in the shared tier is an ordinary remote-tier hit.
Disaggregation changes where a prompt's KV is computed, never the output: the stage is
skipped (the decode replica computes the prompt, as co-located) when the prompt has no
reusable block, when a decode replica already holds all of them (the router picks it),
and when the prefill fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from prometheus_client import Counter, Histogram

from strata.server.config import ServeConfig
from strata.server.replicas.front import Front, NoReplicaError, RouterMetrics
from strata.server.replicas.prompt_keys import RoutedPrompt

logger = logging.getLogger("strata.server")

Outcome = Literal["done", "short", "held", "failed"]


class PrefillStage:
    def __init__(self, handles: list[Any], config: ServeConfig, model_name: str) -> None:
        self.metrics = RouterMetrics(config.router, "strata_prefill_router")
        self.pool = Front(handles, config, model_name, role="prefill", metrics=self.metrics)
        self.outcomes = Counter(
            "strata_prefill_requests", "Requests by what the prefill stage did: done, short "
            "(no full block), held (a decode replica had every block), failed.",
            ["outcome"], registry=self.metrics.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "strata_prefill_seconds", "Time from sending a prefill to its blocks being in "
            "the shared tier.", registry=self.metrics.registry,
        )  # fmt: skip

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    async def run(self, prompt: RoutedPrompt, decode: Front) -> Outcome:
        """Have a prefill replica put the prompt's blocks into the shared tier."""
        outcome = await self._run(prompt, decode)
        self.outcomes.labels(outcome).inc()
        return outcome

    async def _run(self, prompt: RoutedPrompt, decode: Front) -> Outcome:
        keys = prompt.keys
        if not keys:
            return "short"
        held = (decode.index.prefix_blocks(i, keys) for i, up in enumerate(decode.up) if up)
        if max(held, default=0) == len(keys):
            return "held"
        try:
            replica = self.pool.choose(keys, set()).replica
        except NoReplicaError:
            return "failed"
        self.pool.in_flight[replica] += 1
        call = self.pool.handles[replica].prefill.remote(list(prompt.token_ids), prompt.cache_salt)
        try:
            with self.seconds.time():
                await call
        except asyncio.CancelledError:  # the client left: stop the prefill too
            call.cancel()
            raise
        except Exception as exc:  # a bad request, or the replica died: decode computes it
            why = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            logger.warning("prefill-%d: %s; the decode replica computes it", replica, why[0])
            return "failed"
        finally:
            self.pool.in_flight[replica] -= 1
        return "done"
