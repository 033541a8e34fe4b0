"""The engine process: builds the LLMEngine from its config and runs the EngineLoop,
talking to the front end (core/client.py) over two ZMQ sockets.

    front --PUSH--> [prepare | add | abort | fail_all | exit] --PULL--> receiver thread
    front <--PULL-- [hello | load_error | out | reply | fault] <--PUSH-- loop thread

Invariants:
- Only the loop's thread sends: each step's outputs and the stats after them leave as
  ONE "out" message; a "reply" answers a prepare.
- A prepare builds the request's Sequence with the engine's own checks (as the
  in-process `prepare` does) and replies with its seed and max_tokens; an add rebuilds
  it from those, so an unseeded request samples as it would in process.
- A structured output compiles on the grammar compiler's threads; the prepare waits
  in the command queue, never in a step.
- The process exits when the front end tells it to, or when the front end's process is
  gone (its parent pid changes); it ignores SIGINT and SIGTERM, which a terminal or a
  service manager sends the whole process group: the front end drains first.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from strata.config import EngineConfig
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

PARENT_POLL_S = 0.5
LINGER_MS = 2000  # for the last messages to reach the front end at exit


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs of the engine, sent (pickled) once it has loaded."""

    tokenizer: Any | None
    model_name: str
    vocab_size: int
    max_model_len: int
    stats: dict[str, Any]


def run_engine_process(
    config: EngineConfig, make_engine: Callable[[EngineConfig], LLMEngine],
    inbox_address: str, outbox_address: str, parent_pid: int, log_level: int,
) -> None:  # fmt: skip
    """The spawned process's main: load, say hello (or why not), serve until told to exit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname)s %(name)s (engine process): %(message)s",
    )  # fmt: skip
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    context = zmq.Context()
    outbox = context.socket(zmq.PUSH)
    outbox.connect(outbox_address)
    inbox = context.socket(zmq.PULL)
    inbox.connect(inbox_address)
    try:
        engine = make_engine(config)
    except BaseException as exc:
        outbox.send(pack(["load_error", _pickled_error(exc)]))
        outbox.close(linger=LINGER_MS)
        return
    core = EngineCore(outbox)
    info = EngineInfo(
        engine.tokenizer, engine.loaded.name, engine.model_config.vocab_size,
        engine.max_model_len, engine.stats(),
    )  # fmt: skip
    outbox.send(pack(["hello", pickle.dumps(info)]))
    threading.Thread(target=_receive, args=(inbox, core), daemon=True).start()
    try:
        core.run(engine)
    finally:
        engine.close()
        outbox.close(linger=LINGER_MS)


def _exit_with_parent(parent_pid: int) -> None:
    """An orphaned engine (the front end was killed) exits rather than hold the device."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    logger.warning("the front end (pid %d) is gone; the engine process exits", parent_pid)
    os._exit(1)


def _receive(inbox: zmq.Socket, core: EngineCore) -> None:
    """Front-end messages become loop commands, in order."""
    while True:
        message = unpack(inbox.recv())
        kind = message[0]
        if kind == "prepare":
            core.send("prepare", message[1:])
        elif kind == "add":
            core.send("add_wire", message[1])
        elif kind in ("abort", "fail_all"):
            core.send(kind, message[1])
        elif kind == "exit":
            core.send("exit", None)
            return


def _pickled_error(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


class EngineCore(EngineLoop[SentState]):
    """The loop in the engine process: outputs and stats leave as one message a step."""

    def __init__(self, outbox: zmq.Socket) -> None:
        super().__init__()
        self._outbox = outbox
        self._items: list[list[Any]] = []  # delivered since the last publish

    def deliver(self, outputs: list[tuple[SentState, RequestOutput]]) -> None:
        self._items += [state.encode(out) for state, out in outputs]

    def publish(self, stats: dict[str, Any], num_added: int) -> None:
        self._outbox.send(pack(["out", self._items, stats, num_added]))
        self._items = []

    def on_fault(self, message: str) -> None:
        self._outbox.send(pack(["fault", message]))

    def other_command(self, command: str, payload: Any) -> None:
        if command == "prepare":
            self._prepare(payload)
        elif command == "add_wire":
            self._add_wire(payload)
        else:
            super().other_command(command, payload)

    def _prepare(self, payload: list[Any]) -> None:
        call_id, request_id, text, ids, fields = payload
        try:
            params = params_from_wire(dict(fields))
            so = params.structured_output
            if so is not None and self.engine.tokenizer is not None:
                compiling = self.engine.requests.grammars.submit(so)
                if not compiling.done():  # come back once compiled (or failed)
                    compiling.add_done_callback(lambda _: self.send("prepare", payload))
                    return
            seq = self.engine.requests.build(text, ids, params, request_id, stream=True)
        except Exception as exc:
            self._outbox.send(pack(["reply", call_id, error_to_wire(exc), None]))
            return
        self._outbox.send(pack(["reply", call_id, None, [seq.seed, seq.max_tokens]]))

    def _add_wire(self, items: list[list[Any]]) -> None:
        pairs: list[tuple[EngineSequence, SentState]] = []
        refused: list[tuple[SentState, RequestOutput]] = []
        for request_id, text, ids, fields, seed in items:
            if self.fault is not None:  # after an engine fault: every request ends with it
                refused.append((SentState(), _error(request_id, text, ids, self.fault)))
                continue
            try:
                params = params_from_wire(dict(fields))
                seq = self.engine.requests.build(text, ids, params, request_id, True, seed)
            except Exception as exc:  # checked at prepare: only a changed engine gets here
                refused.append((SentState(), _error(request_id, text, ids, str(exc))))
                continue
            pairs.append((seq, SentState()))
        self.num_added += len(refused)
        if refused:
            self.deliver(refused)
        self.add(pairs)
        if self.fault is not None:  # the loop no longer publishes after its commands
            self.publish(self.stats, self.num_added)


def _error(request_id: str, text: str | None, ids: list[int], message: str) -> RequestOutput:
    return RequestOutput(request_id, text, ids, finished=True, finish_reason="error", error=message)
