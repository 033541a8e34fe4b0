"""`strata serve --api-server-count N`: N HTTP front processes on one host:port, all
served by ONE engine process. One process doing all the HTTP, JSON and SSE work limits
throughput long before the engine does; N fronts spread that work over N cores.

    parent (this process: binds the port, forwards signals, reaps)
      |-- engine process (core/process.py): one LLMEngine, N channel pairs + control
      |-- front 0 .. N-1 (front_process.py): FastAPI app + ProcessEngine(SharedEngine)

Port sharing: the parent binds and listens on one socket and every front inherits it
(passed to the spawned processes as uvicorn's own --workers does); each front's event
loop accepts from it, and the kernel hands each connection to one of them. Chosen over
SO_REUSEPORT because the port is bound exactly once, before anything starts (a port in
use fails here, at once, with one clear error), no other process can join the port the
way a second SO_REUSEPORT binder could, and a front that exits takes no queued
connections with it (SO_REUSEPORT gives each socket its own accept queue).

Routing (core/channels.py, core/process.py): each front binds its own pair of IPC
sockets and the engine connects to all of them, so the socket a command arrives on
names its front; the engine routes each request's outputs, and each prepare's reply,
back to that front only. Request ids are checked engine-side: an id already in flight
from any front is refused to its sender ("request id ... is already in use"), never
cross-delivered; a front's abort or fail_all reaches its own requests only. Every front
gets the engine-wide stats with every step (/metrics, /health, the waiting count).

Lifecycle:
- Loading: every front answers 503 until the engine has sent it "hello".
- SIGINT or SIGTERM to the parent: each front gets DRAIN_SIGNAL and drains as one
  server does (DrainingServer: new requests 503, those in flight finish within
  --shutdown-timeout); once every front has exited, the parent tells the engine to exit
  (control socket), waits for it, and kills it only if it hangs. A second signal stops
  the fronts at once. Fronts and engine ignore SIGINT/SIGTERM themselves: signals sent
  to the whole process group count once, through the parent.
- The engine exits once every front is gone (each says "bye", or dies) or the parent
  says so, never while a front is alive; fronts drain and exit when the parent dies.
- A front that dies leaves the others serving (the engine aborts its requests).

Per front vs engine-wide: /health and the engine's gauges and counters in /metrics are
the engine's, the same from every front; request latencies and finish counts are the
answering front's (metrics.py). --max-waiting-requests bounds the engine's waiting
queue as each front sees it (the engine's count plus that front's requests in transit),
so N fronts admitting at once may pass it by their requests in transit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from types import FrameType

import zmq

from strata.config import EngineConfig
from strata.engine.core.channels import EngineChannels
from strata.engine.core.client import SharedEngine
from strata.engine.core.process import spawn_engine_process
from strata.engine.core.wire import pack
from strata.engine.engine import LLMEngine
from strata.errors import StrataError
from strata.server.config import ServeConfig
from strata.server.front_process import DRAIN_SIGNAL, run_front

logger = logging.getLogger("strata.server")

BACKLOG = 2048  # uvicorn's default
ENGINE_EXIT_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0


class BindError(StrataError):
    """The port cannot be bound (in use, say); nothing was started."""


def listen(host: str, port: int) -> socket.socket:
    """The one listening socket every front accepts from."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(BACKLOG)
    return sock


def serve_fronts(
    engine_config: EngineConfig, model_name: str, config: ServeConfig, log_level: str,
    make_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine,
) -> int:  # fmt: skip
    """Serve with config.api_server_count fronts until every front has exited; returns
    the exit status (0: every front exited cleanly)."""
    n = config.api_server_count
    sock = listen(config.host, config.port)
    directory = tempfile.mkdtemp(prefix="strata-fronts-")
    channels = EngineChannels.in_dir(directory, n, control=True)
    assert channels.control is not None
    context = zmq.Context()
    control = context.socket(zmq.PUSH)
    control.bind(channels.control)
    level = logging.getLevelName(log_level.upper())
    engine = spawn_engine_process(engine_config, make_engine, channels, level)
    fronts: list[BaseProcess] = []
    try:
        assert engine.pid is not None
        _spawn_fronts(fronts, channels, engine.pid, sock, model_name, config, log_level)
        logger.info(
            "%d HTTP front processes on http://%s:%d (pids %s), one engine process (pid %d); "
            "model %s loading", n, config.host, config.port,
            ", ".join(str(f.pid) for f in fronts), engine.pid, model_name,
        )  # fmt: skip
        codes = _wait_forwarding_signals(fronts)
    finally:  # whatever failed: nothing is left running
        _stop(fronts, engine, control)
        context.term()
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if all(code == 0 for code in codes) else 1


def _spawn_fronts(
    fronts: list[BaseProcess], channels: EngineChannels, engine_pid: int, sock: socket.socket,
    model_name: str, config: ServeConfig, log_level: str,
) -> None:  # fmt: skip
    """Start a front per channel, each added to `fronts` as it starts (so that a failure
    half-way still stops those started)."""
    spawn = get_context("spawn")
    for k, channel in enumerate(channels.fronts):
        args = (k, SharedEngine(channel, engine_pid), sock, model_name, config, log_level)
        front = spawn.Process(target=run_front, name=f"strata-front-{k}", args=(*args, os.getpid()))
        front.start()
        fronts.append(front)


def _wait_forwarding_signals(fronts: list[BaseProcess]) -> list[int | None]:
    """Join every front; SIGINT/SIGTERM here becomes DRAIN_SIGNAL to each front alive."""

    def forward(sig: int, frame: FrameType | None) -> None:
        alive = [f for f in fronts if f.is_alive()]
        logger.info("received %s: draining %d HTTP fronts", signal.Signals(sig).name, len(alive))
        for front in alive:
            assert front.pid is not None
            os.kill(front.pid, DRAIN_SIGNAL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for front in fronts:
            front.join()
            if front.exitcode != 0:
                logger.warning("%s exited with status %s", front.name, front.exitcode)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return [front.exitcode for front in fronts]


def _stop(fronts: list[BaseProcess], engine: BaseProcess, control: zmq.Socket) -> None:
    """Every front first (killed if still running: only after a failure here), then the
    engine: told to exit, killed if it does not."""
    for front in fronts:
        if front.is_alive():
            front.kill()
            front.join(KILL_WAIT_S)
    if engine.is_alive():
        control.send(pack(["exit"]))
        engine.join(ENGINE_EXIT_TIMEOUT_S)
    if engine.is_alive():
        logger.warning("the engine process did not exit; killing it")
        engine.kill()
        engine.join(KILL_WAIT_S)
    control.close(linger=0)
    logger.info("all HTTP fronts and the engine process have exited")
