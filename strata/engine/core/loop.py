"""EngineLoop: steps one LLMEngine and applies the commands its front end sends.

One loop serves both front ends: AsyncEngine runs it on a thread of the server process,
the engine process (core/process.py) runs it beside a ZMQ socket. They differ only in
where a step's outputs go (`deliver`, called once per step with the whole batch) and
where the stats go (`publish`).

Invariants:
- Only the loop's thread calls the engine's `step`, `enqueue`, `abort` and `fail`.
- A request's handle receives exactly one finished output; none after it.
- An exception that escapes a step fails every request in flight, and the loop goes on;
  after an engine fault (out of memory, a device fault) the loop stops stepping and ends
  every request still arriving with the fault, until asked to exit.
- `num_added` counts the sequences the loop has taken from add commands (queued or
  refused); `publish` reports it with the stats that already count them.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from strata.engine.engine import LLMEngine
from strata.engine.outputs import RequestOutput
from strata.engine.sequence import Sequence as EngineSequence
from strata.errors import is_engine_fault

logger = logging.getLogger("strata.engine")

H = TypeVar("H")  # what the front end needs to route a request's outputs


def error_output(request_id: str, seq: EngineSequence | None, message: str) -> RequestOutput:
    """A finished output with reason "error" for a request the engine could not run."""
    out = (
        RequestOutput(request_id, None, [])
        if seq is None
        else RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids)
    )
    out.finished, out.finish_reason, out.error = True, "error", message
    return out


class EngineLoop(ABC, Generic[H]):
    """Commands: ("add", [(Sequence, handle)]), ("abort", request id), ("fail_all", message),
    ("exit", None); subclasses take more in `other_command`."""

    engine: LLMEngine  # set by `run`; commands sent before it wait in the queue

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._handles: dict[str, H] = {}  # requests queued or running
        self.fault: str | None = None  # set by an engine fault: the engine is unusable
        self.num_added = 0
        self.stats: dict[str, Any] = {}

    # ---- what a front end provides ------------------------------------------------------

    @abstractmethod
    def deliver(self, outputs: list[tuple[H, RequestOutput]]) -> None:
        """Hand one step's outputs (or one command's) to the front end, in order."""

    @abstractmethod
    def publish(self, stats: dict[str, Any], num_added: int) -> None:
        """The engine's stats after the outputs delivered so far."""

    def on_fault(self, message: str) -> None:
        """The engine stopped after a fault; requests still arriving end with `message`."""

    def other_command(self, command: str, payload: Any) -> None:
        raise ValueError(f"unknown engine command {command!r}")

    # ---- any thread ---------------------------------------------------------------------

    def send(self, command: str, payload: Any) -> None:
        self._commands.put((command, payload))
        self._wake.set()

    # ---- the loop's thread --------------------------------------------------------------

    def run(self, engine: LLMEngine) -> None:
        """Step `engine` until asked to exit (after a fault: refuse requests until then)."""
        self.engine = engine
        self._publish_stats()
        while True:
            self._wake.clear()
            try:
                if not self._run_commands():
                    return
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                outputs = self.engine.step()
            except Exception as exc:  # a failure outside the model run: fail everything
                outputs = self._fail_everything(exc)
                if is_engine_fault(exc):  # the device is unusable: stop for good
                    self.fault = f"the engine stopped after a fault: {type(exc).__name__}"
                    self.on_fault(self.fault)
                    self._deliver_all(outputs)
                    logger.critical("engine fault; the engine stops: %r", exc)
                    self._refuse_until_exit()
                    return
            self._deliver_all(outputs)

    def add(self, pairs: Sequence[tuple[EngineSequence, H]]) -> None:
        """Queue prepared sequences; one the engine refuses (a duplicate id) ends at once."""
        refused = []
        for seq, handle in pairs:
            try:
                self.engine.enqueue(seq)
            except Exception as exc:
                refused.append((handle, error_output(seq.request_id, seq, str(exc))))
                continue
            self._handles[seq.request_id] = handle
        self.num_added += len(pairs)
        if refused:
            self.deliver(refused)

    def _refuse_until_exit(self) -> None:
        assert self.fault is not None
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    command, payload = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command == "exit":
                    return
                if command == "add":
                    self.num_added += len(payload)
                    self.deliver(
                        [(h, error_output(s.request_id, s, self.fault)) for s, h in payload]
                    )
                    self.publish(self.stats, self.num_added)
                elif command not in ("abort", "fail_all"):
                    self.other_command(command, payload)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        routed = []
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue  # aborted or failed already: its handle had its finished output
            if out.finished:
                del self._handles[out.request_id]
            routed.append((handle, out))
        if routed:
            self.deliver(routed)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        self._deliver(outputs)
        self._publish_stats()

    def _fail_everything(self, exc: Exception) -> list[RequestOutput]:
        logger.exception("engine loop failed; failing every request in flight")
        message = f"the engine failed: {type(exc).__name__}: {exc}"
        try:
            return self.engine.fail(self.engine.request_ids(), message)
        except Exception:
            logger.exception("could not fail the requests cleanly; ending their streams")
            return [error_output(request_id, None, message) for request_id in self._handles]

    def _run_commands(self) -> bool:
        """Apply queued commands; False once asked to exit."""
        changed = False
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            if command == "add":
                self.add(payload)
            elif command == "abort":
                self._abort(payload)
            elif command == "fail_all":
                self._deliver(self.engine.fail(self.engine.request_ids(), payload))
            elif command == "exit":
                for request_id in self.engine.request_ids():
                    self._abort(request_id)
                self._publish_stats()
                return False
            else:
                self.other_command(command, payload)
        if changed:
            self._publish_stats()
        return True

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver([out])

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
        self.publish(self.stats, self.num_added)
