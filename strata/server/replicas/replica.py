"""EngineReplica: the body of one Ray Serve deployment replica — an engine, the usual
OpenAI app over it (app.py), and the events of its prefix index for the router.

The front calls `handle` (streamed), `report` (drains index events, with load), `info`
(once), `metrics` (its app's metrics text, for the front's /metrics), `prefill`
(disaggregated: on the prefill replicas only) and, in tests and benchmarks, `blocks`,
`stats` and `check_integrity`. Serve calls `check_health` and restarts a replica that
fails it or dies; a restarted replica has a new `incarnation` and an empty cache.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from strata.engine.async_engine import AsyncEngine
from strata.engine.engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
from strata.kv.index_events import IndexEvents, observe_index
from strata.server.app import ServerState, build_app
from strata.server.config import ServeConfig
from strata.server.replicas.asgi_call import asgi_call

# Writing a prompt's blocks to the shared tier takes milliseconds; past this the prefill
# is reported failed and the decode replica computes what it does not find.
WRITE_TIMEOUT_S = 30.0


def _make_engine(engine_kwargs: dict[str, Any]) -> LLMEngine:
    from strata.engine.llm import LLM

    return LLM(**engine_kwargs).engine


class EngineReplica:
    def __init__(self, engine_kwargs: dict[str, Any], model_name: str, config: ServeConfig) -> None:
        import torch

        torch.set_num_threads(max(1, int(config.replica_cpus)))
        self.incarnation = uuid.uuid4().hex
        self.events = IndexEvents()
        self.engine = AsyncEngine(lambda: _make_engine(engine_kwargs), config.max_waiting_requests)
        loaded = self.engine.wait_loaded()
        observe_index(loaded.kv, self.events)  # no request yet: nothing mutates the index
        state = ServerState(
            model_name, tuple(config.api_keys), config.public_metrics, config.max_request_bytes,
            config.allow_special_tokens_in_content, config.tool_call_parser,
        )  # fmt: skip
        state.set_engine(self.engine)
        self.state = state
        self.app = build_app(state)

    async def handle(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for message in asgi_call(self.app, request):
            yield message

    async def prefill(self, token_ids: list[int], cache_salt: str | None) -> dict[str, int]:
        """Compute the prompt's KV (sampling one token, which is dropped) and return once
        its full blocks are written through to the shared tier, so that a decode replica
        that looks the prompt up afterwards finds them there. Raises if it could not."""
        tiers = self.engine.engine.tiers
        if tiers is None or tiers.remote is None:
            raise RuntimeError("a prefill replica needs the shared tier (--kv-remote)")
        params = SamplingParams(max_tokens=1, cache_salt=cache_salt)
        seq = await self.engine.prepare(token_ids, params, f"prefill-{uuid.uuid4().hex}")
        (stream,) = self.engine.submit([seq])
        last = None
        try:
            async for out in stream:
                last = out
        finally:
            stream.close()
        if last is None or last.finish_reason in ("error", "abort"):
            raise RuntimeError(f"the prefill failed: {last.error if last else 'no output'}")
        # Its blocks were queued for the tiers in the step that computed them, before the
        # output above was sent: the fence below is ordered after them.
        if not await asyncio.to_thread(tiers.written().wait, WRITE_TIMEOUT_S):
            raise RuntimeError(f"the prompt's blocks were not written within {WRITE_TIMEOUT_S} s")
        return {"prompt_tokens": len(token_ids), "cached_tokens": last.num_cached_tokens}

    async def metrics(self) -> str:
        """The text this replica's own /metrics serves (its app's registry)."""
        return self.state.metrics.render().decode()

    def stats(self) -> dict[str, Any]:
        """The engine's last published stats (tier counters among them)."""
        return dict(self.engine.stats_snapshot)

    def report(self) -> dict[str, Any]:
        """Index events since the last report, in order, and the replica's load."""
        stats = self.engine.stats_snapshot
        total = max(1, int(stats.get("kv_blocks_total", 1)))
        return {
            "incarnation": self.incarnation,
            "events": self.events.drain(),
            "kv_use": int(stats.get("kv_blocks_used", 0)) / total,
            "in_flight": self.engine.num_in_flight if stats else 0,
        }

    def info(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {
            "tokenizer": engine.tokenizer, "root": engine.kv.root,
            "block_size": engine.kv.block_size, "max_model_len": engine.max_model_len,
        }  # fmt: skip

    def blocks(self) -> list[bytes]:
        """The keys of the replica's prefix index now (call while it is idle)."""
        return [key for key, _ in self.engine.engine.kv.index.items()]

    def check_integrity(self) -> None:
        """The engine's own check (pool, index, queues agree), as tests run it in-process;
        call it while the replica is idle: nothing may step the engine meanwhile."""
        engine = self.engine.engine
        if not engine.has_unfinished():
            engine.check_integrity()

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine stopped after a fault")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
