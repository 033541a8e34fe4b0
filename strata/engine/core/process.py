"""The engine process: builds the LLMEngine from its config and runs the EngineLoop,
talking to its front ends (core/client.py) over a pair of ZMQ sockets each
(core/channels.py):

    front k --PUSH--> [attach | prepare | add | abort | fail_all | bye | exit] --PULL--> receiver
    front k <--PULL-- [hello | load_error | out | reply | fault] <--PUSH-- loop thread

Invariants:
- Only the loop's thread sends to a front: each step's outputs for front k and the
  engine-wide stats after them leave as ONE "out" message to front k; every front not
  gone gets one each publish (with no outputs, the stats alone); a "reply" answers a
  prepare on the front that asked.
- A request belongs to the front whose add brought it (its Route): its outputs go only
  there, and only that front's abort, fail_all or departure ends it. An id already in
  flight, from any front, is refused (the engine's duplicate check), to the sender only.
- `num_added` in front k's "out" counts the sequences taken from front k's adds.
- A prepare builds the request's Sequence with the engine's own checks (as the
  in-process `prepare` does) and replies with its seed and max_tokens; an add rebuilds
  it from those, so an unseeded request samples as it would in process.
- A structured output compiles on the grammar compiler's threads; the prepare waits
  in the command queue, never in a step.
- Exit (front_table.py): on "exit" (from the one front, or from the parent's control
  socket with several fronts), or once every front is gone. SIGINT and SIGTERM are
  ignored: a terminal or a service manager sends them the whole process group, and the
  fronts drain first.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from strata.config import EngineConfig
from strata.engine.core.channels import EngineChannels
from strata.engine.core.front_table import FrontTable, watch_fronts
from strata.engine.core.loop import EngineLoop
from strata.engine.core.wire import (
    SentState,
    error_to_wire,
    pack,
    params_from_wire,
    unpack,
)
from strata.engine.engine import LLMEngine
from strata.engine.outputs import RequestOutput
from strata.engine.sequence import Sequence as EngineSequence

logger = logging.getLogger("strata.engine")

LINGER_MS = 2000  # for the last messages to reach the front ends at exit
SEND_WAIT_MS = 500  # a send to a front that does not read is retried until it is gone


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs of the engine, sent (pickled) once it has loaded."""

    tokenizer: Any | None
    model_name: str
    vocab_size: int
    max_model_len: int
    stats: dict[str, Any]


@dataclass
class Route:
    """Engine side: which front a request belongs to, and what that front has of it."""

    front: int
    sent: SentState = field(default_factory=SentState)


def spawn_engine_process(
    config: EngineConfig, make_engine: Callable[[EngineConfig], LLMEngine],
    channels: EngineChannels, log_level: int,
) -> multiprocessing.process.BaseProcess:  # fmt: skip
    """Start the engine process for `channels`; this process is its parent.
    Not daemonic: the engine may start processes of its own (tensor-parallel ranks)."""
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_process, name="strata-engine",
        args=(config, make_engine, channels, os.getpid(), log_level),
    )  # fmt: skip
    process.start()
    return process


def run_engine_process(
    config: EngineConfig, make_engine: Callable[[EngineConfig], LLMEngine],
    channels: EngineChannels, parent_pid: int, log_level: int,
) -> None:  # fmt: skip
    """The spawned process's main: load, say hello (or why not), serve until told to exit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname)s %(name)s (engine process): %(message)s",
    )  # fmt: skip
    context = zmq.Context()
    fronts = FrontTable(len(channels.fronts))
    outboxes = FrontOutboxes(context, channels, fronts)
    inboxes = [_connect(context, zmq.PULL, ch.to_engine) for ch in channels.fronts]
    if channels.control is not None:
        inboxes.append(_connect(context, zmq.PULL, channels.control))
    try:
        engine = make_engine(config)
    except BaseException as exc:
        outboxes.send_all(pack(["load_error", _pickled_error(exc)]))
        outboxes.close()
        return
    core = EngineCore(outboxes)
    threading.Thread(target=watch_fronts, args=(fronts, parent_pid, core.send), daemon=True).start()
    info = EngineInfo(
        engine.tokenizer, engine.loaded.name, engine.model_config.vocab_size,
        engine.max_model_len, engine.stats(),
    )  # fmt: skip
    outboxes.send_all(pack(["hello", pickle.dumps(info)]))
    threading.Thread(target=_receive, args=(inboxes, core, fronts), daemon=True).start()
    try:
        core.run(engine)
    finally:
        engine.close()
        outboxes.close()


def _connect(context: zmq.Context, kind: int, address: str) -> zmq.Socket:
    sock = context.socket(kind)
    sock.connect(address)
    return sock


class FrontOutboxes:
    """One PUSH socket per front. A send waits while its front is slow (backpressure, as
    with one front) but not once the front is gone: its messages are then dropped."""

    def __init__(self, context: zmq.Context, channels: EngineChannels, fronts: FrontTable) -> None:
        self.fronts = fronts
        self._sockets = [_connect(context, zmq.PUSH, ch.from_engine) for ch in channels.fronts]
        for sock in self._sockets:
            sock.setsockopt(zmq.SNDTIMEO, SEND_WAIT_MS)

    def send(self, front: int, data: bytes) -> None:
        while not self.fronts.is_gone(front):
            try:
                self._sockets[front].send(data)
                return
            except zmq.Again:
                continue

    def send_all(self, data: bytes) -> None:
        for front in self.fronts.live():
            self.send(front, data)

    def close(self) -> None:
        """What is still queued for a live front may take LINGER_MS to leave; a gone
        front's is dropped."""
        for front, sock in enumerate(self._sockets):
            sock.close(linger=0 if self.fronts.is_gone(front) else LINGER_MS)


def _receive(inboxes: list[zmq.Socket], core: EngineCore, fronts: FrontTable) -> None:
    """Front-end messages become loop commands, in order per front; the socket a message
    came on names its front (the last socket, if any beyond the fronts', is the parent's)."""
    poller = zmq.Poller()
    for sock in inboxes:
        poller.register(sock, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            front = inboxes.index(sock)
            message = unpack(sock.recv())
            kind = message[0]
            if kind == "exit":
                core.send("exit", None)
                return
            if front >= len(fronts):
                continue  # the parent says only "exit"
            if kind == "attach":
                fronts.attach(front, message[1])
            elif kind == "bye":
                if fronts.leave(front):
                    core.send("detach", front)
            elif kind == "prepare":
                core.send("prepare", (front, message[1:]))
            elif kind in ("add", "abort", "fail_all"):
                core.send(f"{kind}_from", (front, message[1]))


def _pickled_error(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


class EngineCore(EngineLoop[Route]):
    """The loop in the engine process: each front's outputs and the stats leave as one
    message a step to that front."""

    def __init__(self, outboxes: FrontOutboxes) -> None:
        super().__init__()
        self._outboxes = outboxes
        num_fronts = len(outboxes.fronts)
        self._items: list[list[list[Any]]] = [[] for _ in range(num_fronts)]  # since publish
        self._added = [0] * num_fronts  # sequences taken from each front's adds

    def deliver(self, outputs: list[tuple[Route, RequestOutput]]) -> None:
        for route, out in outputs:
            self._items[route.front].append(route.sent.encode(out))

    def publish(self, stats: dict[str, Any], num_added: int) -> None:
        for front in self._outboxes.fronts.live():
            message = ["out", self._items[front], stats, self._added[front]]
            self._outboxes.send(front, pack(message))
        self._items = [[] for _ in self._items]

    def on_fault(self, message: str) -> None:
        self._outboxes.send_all(pack(["fault", message]))

    def other_command(self, command: str, payload: Any) -> None:
        if command == "prepare":
            self._prepare(*payload)
        elif command == "add_from":
            self._add_wire(*payload)
        elif self.fault is not None:
            return  # the engine is stopped: nothing runs to abort or fail
        elif command == "abort_from":
            front, request_id = payload
            route = self._handles.get(request_id)
            if route is not None and route.front == front:  # never another front's request
                self._abort(request_id)
        elif command == "fail_all_from":
            front, message = payload
            self._deliver(self.engine.fail(self._request_ids_of(front), message))
        elif command == "detach":
            for request_id in self._request_ids_of(payload):
                self._abort(request_id)
        else:
            super().other_command(command, payload)

    def _request_ids_of(self, front: int) -> list[str]:
        return [rid for rid, route in self._handles.items() if route.front == front]

    def _prepare(self, front: int, payload: list[Any]) -> None:
        call_id, request_id, text, ids, fields = payload
        try:
            params = params_from_wire(dict(fields))
            so = params.structured_output
            if so is not None and self.engine.tokenizer is not None:
                compiling = self.engine.requests.grammars.submit(so)
                if not compiling.done():  # come back once compiled (or failed)
                    compiling.add_done_callback(
                        lambda _: self.send("prepare", (front, payload))
                    )
                    return
            seq = self.engine.requests.build(text, ids, params, request_id, stream=True)
        except Exception as exc:
            self._reply(front, call_id, error_to_wire(exc), None)
            return
        self._reply(front, call_id, None, [seq.seed, seq.max_tokens])

    def _reply(self, front: int, call_id: int, error: Any, result: Any) -> None:
        self._outboxes.send(front, pack(["reply", call_id, error, result]))

    def _add_wire(self, front: int, items: list[list[Any]]) -> None:
        pairs: list[tuple[EngineSequence, Route]] = []
        refused: list[tuple[Route, RequestOutput]] = []
        for request_id, text, ids, fields, seed in items:
            if self.fault is not None:  # after an engine fault: every request ends with it
                refused.append((Route(front), _error(request_id, text, ids, self.fault)))
                continue
            try:
                params = params_from_wire(dict(fields))
                seq = self.engine.requests.build(text, ids, params, request_id, True, seed)
            except Exception as exc:  # checked at prepare: only a changed engine gets here
                refused.append((Route(front), _error(request_id, text, ids, str(exc))))
                continue
            pairs.append((seq, Route(front)))
        self.num_added += len(refused)
        self._added[front] += len(items)
        if refused:
            self.deliver(refused)
        self.add(pairs)  # a duplicate id is refused here, to this front's Route
        if self.fault is not None:  # the loop no longer publishes after its commands
            self.publish(self.stats, self.num_added)


def _error(request_id: str, text: str | None, ids: list[int], message: str) -> RequestOutput:
    return RequestOutput(request_id, text, ids, finished=True, finish_reason="error", error=message)
