"""`strata serve`: load the model in the background and serve the HTTP app with uvicorn.

The socket opens at once; /health answers 503 until the model has loaded. On SIGTERM
or SIGINT the server drains: new requests get 503, requests in flight run to the end
for up to `shutdown_timeout_s`; those still running then fail (a stream ends with an
error event and [DONE]) and uvicorn stops, all within `shutdown_timeout_s`. A second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn

from strata.engine.async_engine import AsyncEngine
from strata.engine.engine import LLMEngine
from strata.engine.front import EngineFront
from strata.server.app import ServerState, build_app
from strata.server.config import ServeConfig

logger = logging.getLogger("strata.server")

FLUSH_S = 0.1  # for the last events to reach the clients


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains in-flight requests before stopping."""

    def __init__(self, config: uvicorn.Config, state: ServerState, timeout_s: float) -> None:
        super().__init__(config)
        self.strata = state
        self.timeout_s = timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.strata.draining or self.strata.engine is None:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain
            return
        self.strata.engine.stop()
        logger.info(
            "received %s: draining %d requests (up to %.0f s); new requests get 503",
            signal.Signals(sig).name, self.strata.engine.num_in_flight, self.timeout_s,
        )  # fmt: skip
        asyncio.get_event_loop().create_task(self._drain(sig, frame))

    async def _drain(self, sig: int, frame: FrameType | None) -> None:
        engine = self.strata.engine
        assert engine is not None
        # The whole drain, failing and flushing included, ends within timeout_s.
        deadline = time.monotonic() + max(0.0, self.timeout_s - 2 * FLUSH_S)
        while engine.num_in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = engine.num_in_flight
        if left:
            logger.warning("shutdown timeout: failing %d requests still in flight", left)
            # Each stream gets an error event and [DONE]; each waiting client a 500.
            engine.fail_all("the server shut down before this request finished")
            await asyncio.sleep(FLUSH_S)
        else:
            logger.info("all requests finished; stopping")
        await asyncio.sleep(FLUSH_S)  # let the last responses flush
        super().handle_exit(sig, frame)
        # A drained shutdown is a clean exit (status 0): uvicorn would re-raise the signal.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def start_loading(
    state: ServerState,
    make_engine: Callable[[], LLMEngine],
    max_waiting_requests: int | None,
    on_error: Callable[[], None],
) -> threading.Thread:
    """Build the engine on a thread of this process; the app serves 503 until it is ready."""
    return start_client(state, AsyncEngine(make_engine, max_waiting_requests), on_error)


def start_client(
    state: ServerState, engine: EngineFront, on_error: Callable[[], None]
) -> threading.Thread:
    """Wait on a thread for `engine` to load; the app serves 503 until it is ready."""

    def wait() -> None:
        try:
            engine.wait_loaded()
        except BaseException as exc:
            state.load_error = f"the model failed to load: {type(exc).__name__}: {exc}"
            logger.error("%s", state.load_error)
            on_error()
            return
        state.set_engine(engine)
        logger.info(
            "ready: serving %s, max_model_len %d, max_waiting_requests %s",
            state.model_name, engine.max_model_len, engine.max_waiting_requests or "unlimited",
        )  # fmt: skip

    thread = threading.Thread(target=wait, name="strata-load", daemon=True)
    thread.start()
    return thread


def serve(
    engine: EngineFront, model_name: str, config: ServeConfig, log_level: str,
    front: FrontSpec | None = None,
) -> int:  # fmt: skip
    """Serve `engine` (loading: AsyncEngine or ProcessEngine) until stopped; returns the
    process exit code. `front`: this process is one of several HTTP fronts (api_fronts.py)
    on a listening socket its parent bound."""
    host, port = config.host, config.port
    state = ServerState(
        model_name, tuple(config.api_keys), config.public_metrics, config.max_request_bytes,
        config.allow_special_tokens_in_content, config.tool_call_parser,
        front=None if front is None else front.index,
    )  # fmt: skip
    app = build_app(state)
    uvicorn_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), access_log=False,
        timeout_graceful_shutdown=1,  # the drain (DrainingServer) has emptied the server
    )  # fmt: skip
    server_class = DrainingServer if front is None else front.server_class
    server = server_class(uvicorn_config, state, config.shutdown_timeout_s)
    failed = threading.Event()

    def stop_on_error() -> None:
        failed.set()
        server.should_exit = True

    start_client(state, engine, stop_on_error)
    if front is None:
        logger.info("listening on http://%s:%d (model %s loading)", host, port, model_name)
    server.run(sockets=None if front is None else [front.socket])
    engine.shutdown()
    return 1 if failed.is_set() else 0


@dataclass(frozen=True)
class FrontSpec:
    """One of several HTTP fronts: its index, the listening socket it shares, and the
    server class that takes its drain signal from the parent."""

    index: int
    socket: socket.socket
    server_class: type[DrainingServer]
