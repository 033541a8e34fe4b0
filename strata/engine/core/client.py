"""ProcessEngine: the engine in a process of its own, served to the asyncio front end.

The HTTP work (JSON, SSE, tokenization, chat templates) and the engine loop no longer
share one GIL. The front end tokenizes (with the tokenizer the engine sends once it has
loaded); the engine process checks each request as the in-process engine would (a
prepare round trip: the same InvalidRequestError, type, message and param), steps, and
sends each step's outputs in one message; a receiver thread here turns them into
RequestOutputs on the requests' streams, one event-loop callback per message.

Invariants:
- Every request submitted and not yet finished has an entry in `_requests`; its entry
  goes with its finished output (from the engine, or from here if the engine died).
- The engine process dying unexpectedly is an engine fault: /health 503, every request
  in flight ends with reason "error", every prepare waiting raises EngineStoppedError.
- One socket each way; sends hold `_send_lock` (ZMQ sockets are not thread-safe).
- Once the engine says hello, the front sends "attach" with its pid: the engine watches
  it, and aborts this front's requests if it dies. "attach" and "bye" never block for
  long (a PUSH socket with no engine connected would block forever).
- One of several fronts (SharedEngine) never stops the engine: it says "bye" and goes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from strata.config import EngineConfig
from strata.engine.core.channels import EngineChannels, FrontChannel, pid_alive
from strata.engine.core.loop import error_output
from strata.engine.core.process import EngineInfo, spawn_engine_process
from strata.engine.core.wire import (
    ReceivedState,
    error_from_wire,
    failed_item,
    pack,
    params_to_wire,
    unpack,
)
from strata.engine.engine import LLMEngine
from strata.engine.front import EngineFront, EngineStoppedError, RequestStream
from strata.engine.outputs import RequestOutput
from strata.engine.prompt_encoder import PromptEncoder
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence as EngineSequence

logger = logging.getLogger("strata.engine")

POLL_MS = 200  # how often the receiver looks whether the engine process still runs
EXIT_TIMEOUT_S = 30.0
BYE_LINGER_MS = 1000  # for a leaving front's "bye" to reach the shared engine
BYE_TIMEOUT_S = 1.0
ATTACH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SharedEngine:
    """An engine process started elsewhere (by `strata serve --api-server-count N`'s
    parent), that this front reaches over `channel` and watches by its pid."""

    channel: FrontChannel
    engine_pid: int


class ProcessEngine(EngineFront):
    """The engine in a process of its own. Given an EngineConfig, it spawns that process
    and owns it (its only front); given a SharedEngine, it is one front of several and
    leaves the engine running when it shuts down. `wait_loaded` blocks until the engine
    has loaded. make_engine builds the engine there from the config (tests pass a
    module-level function that wraps LLMEngine: it is pickled by name)."""

    def __init__(
        self, engine: EngineConfig | SharedEngine, max_waiting_requests: int | None = None,
        log_level: int | None = None, make_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine,
    ) -> None:  # fmt: skip
        super().__init__(max_waiting_requests)
        self._dir: str | None = None
        self._process: BaseProcess | None = None  # the engine process, when this front owns it
        if isinstance(engine, SharedEngine):
            channel, self._engine_pid = engine.channel, engine.engine_pid
        else:
            self._dir = tempfile.mkdtemp(prefix="strata-engine-")
            channels = EngineChannels.in_dir(self._dir, 1)
            channel = channels.fronts[0]
        self._context = zmq.Context()
        self._outbox = self._context.socket(zmq.PUSH)
        self._outbox.bind(channel.to_engine)
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.bind(channel.from_engine)
        self._send_lock = threading.Lock()
        self._info: EngineInfo | None = None
        self._encoder: PromptEncoder | None = None
        self._requests: dict[str, tuple[RequestStream, ReceivedState]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._closing = False  # shutdown asked: the engine process exits (or we leave it)
        if not isinstance(engine, SharedEngine):
            level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
            self._process = spawn_engine_process(engine, make_engine, channels, level)
            assert self._process.pid is not None
            self._engine_pid = self._process.pid
            atexit.register(self._kill)
        self._receiver = threading.Thread(
            target=self._receive, name="strata-engine-rx", daemon=True
        )
        self._receiver.start()

    # ---- what the engine is -------------------------------------------------------------

    def wait_loaded(self, timeout: float | None = None) -> EngineInfo:
        """Block until the engine has loaded; raises the engine's error if it did not."""
        self._wait_for_load(timeout)
        assert self._info is not None
        return self._info

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("the engine has not loaded yet")
        return self._info

    @property
    def tokenizer(self) -> Any | None:
        return self.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def alive(self) -> bool:
        return self._engine_alive() and self._fault is None

    @property
    def pid(self) -> int:
        """The engine process's."""
        return self._engine_pid

    @property
    def num_in_flight(self) -> int:
        """Sharing the engine: this front's own requests (the engine's counts are every
        front's; a front drains its own)."""
        if self._process is None:
            return len(self._requests)
        return super().num_in_flight

    def _engine_alive(self) -> bool:
        if self._process is not None:
            return self._process.is_alive()
        return pid_alive(self._engine_pid)

    def check_text_length(self, num_chars: int, param: str = "prompt") -> None:
        assert self._encoder is not None
        self._encoder.check_text_length(num_chars, param)

    # ---- asyncio side ---------------------------------------------------------------------

    async def prepare(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str
    ) -> EngineSequence:
        """Tokenize here (on the tokenizer thread), then let the engine check the request;
        the Sequence returned carries what the engine resolved (seed, max_tokens)."""
        assert self._encoder is not None
        text, ids = await self.run_in_tokenizer_thread(self._encoder.encode_prompt, prompt)
        seed, max_tokens = await self._call(
            ["prepare", request_id, text, ids, params_to_wire(params)]
        )
        return EngineSequence(request_id, text, ids, params, seed, max_tokens)

    async def _call(self, message: list[Any]) -> Any:
        if self._fault is not None:
            raise EngineStoppedError(self._fault)
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._push([message[0], call_id, *message[1:]])
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _send(self, command: str, payload: Any) -> None:
        self._push([command, payload])

    def _send_add(self, seqs: Sequence[EngineSequence], streams: list[RequestStream]) -> None:
        items = []
        for seq, stream in zip(seqs, streams, strict=True):
            if seq.request_id in self._requests:  # the engine would refuse it, as in process
                self._refuse_duplicate(seq, stream)
                continue
            state = ReceivedState(seq.prompt, seq.prompt_token_ids)
            self._requests[seq.request_id] = (stream, state)
            fields = params_to_wire(seq.params)
            items.append([seq.request_id, seq.prompt, seq.prompt_token_ids, fields, seq.seed])
        if items:
            self._push(["add", items])

    def _refuse_duplicate(self, seq: EngineSequence, stream: RequestStream) -> None:
        """A second request under an id in flight ends at once with the engine's error;
        the engine never sees it, so it is not waiting."""
        with self._lock:
            self._num_submitted -= 1
        message = f"request id {seq.request_id!r} is already in use"
        stream.put(error_output(seq.request_id, seq, message))

    def _push(self, message: list[Any]) -> None:
        data = pack(message)
        with self._send_lock:
            if not self._outbox.closed:
                self._outbox.send(data)

    def _push_soon(self, message: list[Any], timeout_s: float) -> bool:
        """Send without blocking for long: False if the engine did not take it in time
        (gone, or never connected); a plain send would wait for it forever."""
        data = pack(message)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._send_lock:
                if self._outbox.closed:
                    return False
                try:
                    self._outbox.send(data, zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    pass
            if time.monotonic() > deadline or not self._engine_alive():
                return False
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Owning the engine: ask its process to exit (it aborts what is in flight), and
        wait for it. Sharing it: leave ("bye": the engine aborts this front's requests)."""
        self._stopping = self._closing = True
        if self._process is None:
            self._push_soon(["bye"], BYE_TIMEOUT_S)
        elif self._process.is_alive():
            self._push(["exit"])
            self._process.join(EXIT_TIMEOUT_S)
        self._kill()
        self._receiver.join(timeout=5)
        with self._send_lock:
            self._outbox.close(linger=0 if self._process is not None else BYE_LINGER_MS)
        if not self._receiver.is_alive():  # it has closed its socket
            self._context.term()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _kill(self) -> None:
        self._closing = True
        if self._process is not None and self._process.is_alive():  # it ignores SIGTERM
            self._process.kill()
            self._process.join(5)
        if self._process is not None:
            atexit.unregister(self._kill)

    # ---- receiver thread ------------------------------------------------------------------

    def _receive(self) -> None:
        try:
            while not (self._closing and self._process is None):  # a front that left stops
                if self._inbox.poll(POLL_MS):
                    self._handle(unpack(self._inbox.recv()))
                elif not self._engine_alive():
                    self._engine_gone()
                    return
        finally:
            self._inbox.close(linger=0)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "out":
            _, items, stats, num_added = message
            self._dispatch(items)
            self._set_stats(stats, num_added)
        elif kind == "reply":
            _, call_id, error, result = message
            future = self._calls.get(call_id)
            if future is not None:
                exc = None if error is None else error_from_wire(error)
                future.get_loop().call_soon_threadsafe(_settle, future, result, exc)
        elif kind == "hello":
            self._loaded_with(pickle.loads(message[1]))
        elif kind == "fault":
            self._on_fault(message[1])
        elif kind == "load_error":
            self._load_error = pickle.loads(message[1])
            self._loaded.set()

    def _loaded_with(self, info: EngineInfo) -> None:
        self._encoder = PromptEncoder(
            info.tokenizer, info.model_name, info.vocab_size, info.max_model_len
        )
        self._set_stats(info.stats, 0)
        # The engine has connected (before loading): it can take "attach" now.
        if not self._push_soon(["attach", os.getpid()], ATTACH_TIMEOUT_S):
            logger.warning("the engine process did not take this front's attach")
        self._info = info
        self._loaded.set()

    def _dispatch(self, items: list[list[Any]]) -> None:
        """One step's outputs onto their streams: one event-loop callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]]
        by_loop = defaultdict(list)
        for item in items:
            request_id = item[0]
            entry = self._requests.get(request_id)
            if entry is None:
                continue
            stream, state = entry
            out = state.decode(item)
            if out.finished:
                del self._requests[request_id]
            by_loop[stream.loop].append((stream, out))
        for loop, outputs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
                loop.call_soon_threadsafe(_put_all, outputs)

    def _engine_gone(self) -> None:
        """The engine process exited: on purpose (shutdown), or not (an engine fault)."""
        code = "unknown" if self._process is None else self._process.exitcode
        message = f"the engine process exited unexpectedly (exit code {code})"
        if not self._loaded.is_set():
            self._load_error = RuntimeError(message)
            self._loaded.set()
        if self._closing:
            return
        logger.critical("%s; failing every request in flight", message)
        self._on_fault(message)
        for call_id in list(self._calls):
            future = self._calls.get(call_id)
            if future is not None:
                exc = EngineStoppedError(message)
                future.get_loop().call_soon_threadsafe(_settle, future, None, exc)
        self._dispatch(
            [
                failed_item(request_id, message, len(state.token_ids))
                for request_id, (_, state) in list(self._requests.items())
            ]
        )
        with self._lock:  # nothing runs any more
            stats = {**self.stats_snapshot, "num_running": 0, "num_waiting": 0}
            self.stats_snapshot, self._num_added = stats, self._num_submitted


def _put_all(outputs: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in outputs:
        stream.put(out)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
