"""Run a real Strata server (uvicorn on a loopback port) inside the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from strata.config import EngineConfig
from strata.engine.async_engine import AsyncEngine
from strata.engine.core.client import ProcessEngine
from strata.engine.engine import LLMEngine
from strata.engine.front import EngineFront
from strata.engine.llm import LLM
from strata.options import build
from strata.server.app import ServerState, build_app
from strata.server.serve import DrainingServer, start_client, start_loading


@dataclass
class RunningServer:
    url: str
    state: ServerState
    server: DrainingServer
    thread: threading.Thread

    @property
    def engine(self) -> LLMEngine:
        """The engine object (in-process servers only)."""
        assert isinstance(self.state.engine, AsyncEngine), "the engine runs in its own process"
        return self.state.engine.engine

    @property
    def in_process(self) -> bool:
        return isinstance(self.state.engine, AsyncEngine)

    def stats(self) -> dict:
        """The engine's stats: asked of it in process, else its latest published snapshot
        (the engine process publishes after every step and command)."""
        if self.in_process:
            return self.engine.stats()
        assert self.state.engine is not None
        return dict(self.state.engine.stats_snapshot)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the engine has no request queued or running."""
        assert self.state.engine is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            engine = self.state.engine
            stats = engine.stats_snapshot
            if engine.num_in_flight == 0 and not stats["num_loading"]:
                return
            time.sleep(0.02)
        stats = self.state.engine.stats_snapshot
        raise TimeoutError(f"engine still busy after {timeout} s: {stats}")

    def assert_no_leaks(self) -> None:
        """Once idle: the engine's KV state is consistent and every block is free, but for
        those that session pins hold (a request with session_id keeps its turn's KV for
        its TTL)."""
        self.wait_idle()
        if self.in_process:
            self.engine.check_integrity()
        stats = self.stats()

        def unaccounted() -> int:  # blocks neither free nor held by a session pin
            free, pinned = stats["kv_blocks_free"], stats["kv_session_blocks_on_gpu"]
            return int(stats["kv_blocks_total"] - free - pinned)

        deadline = time.monotonic() + 5.0  # a finished request's blocks return within a step
        while unaccounted() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = self.stats()
        pinned = stats["kv_session_blocks_on_gpu"]
        assert stats["kv_blocks_free"] + pinned == stats["kv_blocks_total"], stats
        assert (pinned > 0) == (stats["kv_sessions_pinned_gpu"] > 0), stats

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.state.engine is not None:
            self.state.engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    make_engine: Callable[[], LLMEngine] | EngineFront,
    model_name: str = "test-model",
    api_key: str | None = None,
    max_waiting_requests: int | None = None,
    shutdown_timeout_s: float = 10.0,
    wait_ready: bool = True,
    api_keys: tuple[str, ...] = (),
    **state_options: object,
) -> RunningServer:
    """Start a server; return once /health is 200 (or, without wait_ready, once it answers).
    make_engine: the engine, built on a thread of this process, or an engine front
    (a ProcessEngine: see process_engine). state_options: ServerState's (public_metrics,
    max_request_bytes)."""
    keys = (api_key, *api_keys) if api_key else api_keys
    state = ServerState(model_name=model_name, api_keys=keys, **state_options)  # type: ignore[arg-type]
    port = free_port()
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = DrainingServer(config, state, shutdown_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if isinstance(make_engine, EngineFront):
        start_client(state, make_engine, lambda: None)
    else:
        start_loading(state, make_engine, max_waiting_requests, lambda: None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/health", timeout=1).status_code
            if status == 200 or not wait_ready:
                return RunningServer(url, state, server, thread)
        except httpx.TransportError:
            pass
        if state.load_error:
            raise RuntimeError(state.load_error)
        time.sleep(0.05)
    raise TimeoutError("server did not become healthy")


def process_engine(
    model: str | None,
    max_waiting_requests: int | None = None,
    make_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine,
    **kwargs: object,
) -> ProcessEngine:
    """An engine in its own process, built from LLM(model, device="cpu", **kwargs)'s config
    by make_engine (a module-level function: it is pickled to the engine process)."""
    config = build(EngineConfig, {"model": model, "device": "cpu", **kwargs})
    return ProcessEngine(config, max_waiting_requests, make_engine=make_engine)


def engine_factory(model: str | None, **kwargs: object) -> Callable[[], LLMEngine]:
    return lambda: LLM(model, device="cpu", **kwargs).engine  # type: ignore[arg-type]


# Where a parametrised server's engine runs: "thread" (AsyncEngine, in the test process),
# "process" (ProcessEngine, the default of `strata serve`).
ENGINES: dict[str, Callable[..., Any]] = {"thread": engine_factory, "process": process_engine}
