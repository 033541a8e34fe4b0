"""AsyncEngine: drives one LLMEngine from a background thread for asyncio front ends.

The engine thread owns the LLMEngine: it alone calls `step`, `enqueue` and `abort`.
The asyncio side hands it commands through a thread-safe queue and receives each
request's outputs on its RequestStream, so the event loop never waits on a step.
Tokenization runs on one worker thread (`prepare`), off both the loop and the engine.

Invariants:
- A request's stream ends with exactly one finished output (stop, length, abort or
  error); after it the engine holds no blocks for that request.
- Closing the RequestStream of an unfinished request (a client that went away)
  aborts it; the engine thread frees its blocks before its next step.
- An exception that escapes a step fails every request in flight, and the loop goes on;
  after an engine fault (out of memory, a device fault) the loop stops: /health is 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from strata.engine.engine import LLMEngine
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence as EngineSequence
from strata.errors import StrataError, is_engine_fault

logger = logging.getLogger("strata.engine")


class QueueFullError(StrataError):
    """The waiting queue holds `max_waiting_requests` already; retry later."""


class EngineStoppedError(StrataError):
    """The engine is shutting down and takes no new requests."""


class RequestStream:
    """One request's outputs, in order; iterate with `async for`.

    `close()` aborts the request unless it has finished; call it when the consumer
    goes away (it is idempotent).
    """

    def __init__(
        self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    def put_threadsafe(self, out: RequestOutput) -> None:
        """Called from the engine thread."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)


class AsyncEngine:
    """Build an LLMEngine on the engine thread and serve it to asyncio callers.

    The engine is built on the thread that steps it: on CPU, torch work split across
    threads makes each one's OpenMP pool contend with the others' (a 2x slowdown measured
    on 2 cores), so loading and stepping share one thread.
    """

    def __init__(
        self, make_engine: Callable[[], LLMEngine], max_waiting_requests: int | None = None
    ) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._engine: LLMEngine | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._lock = threading.Lock()
        self._num_submitted_not_queued = 0  # guarded by _lock
        self._stopping = False
        self._fault: str | None = None  # set by an engine fault: the engine is unusable
        self.stats_snapshot: dict[str, Any] = {}
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="strata-tokenize")
        self._thread = threading.Thread(
            target=self._main, args=(make_engine,), name="strata-engine", daemon=True
        )
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> LLMEngine:
        """Block until the engine is built; re-raises the error if building failed."""
        if not self._loaded.wait(timeout):
            raise TimeoutError(f"the engine did not load within {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        assert self._engine is not None
        return self._engine

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("the engine has not loaded yet")
        return self._engine

    # ---- asyncio side ---------------------------------------------------------------------

    async def run_in_tokenizer_thread(self, fn: Any, *args: Any) -> Any:
        """Run tokenizer work (chat templates, say) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    async def prepare(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str
    ) -> EngineSequence:
        """Tokenize and validate a request on the tokenizer thread; raises if it is bad.
        A grammar is compiled first, on the compiler's threads, without holding up the
        tokenizer thread (InvalidRequestError if it does not compile)."""
        if params.structured_output is not None:
            await self.engine.requests.grammars.compile_async(params.structured_output)
        return await self.run_in_tokenizer_thread(
            self.engine.prepare, prompt, params, request_id, True
        )

    def num_waiting(self) -> int:
        with self._lock:
            return int(self.stats_snapshot["num_waiting"]) + self._num_submitted_not_queued

    def submit(self, seqs: Sequence[EngineSequence]) -> list[RequestStream]:
        """Queue prepared sequences together (all or none) and return their output streams.

        Raises QueueFullError if they would overflow the waiting queue, and
        EngineStoppedError once `stop` was called.
        """
        if self._stopping:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        with self._lock:
            waiting = int(self.stats_snapshot["num_waiting"]) + self._num_submitted_not_queued
            limit = self.max_waiting_requests
            if limit is not None and waiting + len(seqs) > limit:
                raise QueueFullError(
                    f"the waiting queue is full ({waiting} waiting, limit {limit}); retry later"
                )
            self._num_submitted_not_queued += len(seqs)
        streams = [RequestStream(self, seq.request_id, loop) for seq in seqs]
        self._send("add", list(zip(seqs, streams, strict=True)))
        return streams

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def fail_all(self, message: str) -> None:
        """Finish every request in flight with reason "error" and this message."""
        self._send("fail_all", message)

    def stop(self) -> None:
        """Refuse new requests; those in flight run to the end."""
        self._stopping = True

    def shutdown(self) -> None:
        """Stop the engine thread after aborting whatever is still in flight."""
        self._stopping = True
        self._send("exit", None)
        self._thread.join(timeout=30)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def stopping(self) -> bool:
        """True once `stop` or `shutdown` was called: new requests are refused."""
        return self._stopping

    @property
    def num_in_flight(self) -> int:
        return int(self.stats_snapshot["num_running"]) + self.num_waiting()

    @property
    def alive(self) -> bool:
        """The engine thread runs and no engine fault has stopped it."""
        return self._thread.is_alive() and self._fault is None

    def _send(self, command: str, payload: Any) -> None:
        self._commands.put((command, payload))
        self._wake.set()

    # ---- engine thread --------------------------------------------------------------------

    def _main(self, make_engine: Callable[[], LLMEngine]) -> None:
        try:
            self._engine = make_engine()
            self.stats_snapshot = self._engine.stats()
        except BaseException as exc:
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        try:
            self._loop()
        finally:
            self._engine.close()

    def _loop(self) -> None:
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
                    self._fault = f"the engine stopped after a fault: {type(exc).__name__}"
                    self._stopping = True
                    self._deliver_all(outputs)
                    logger.critical("engine fault; the engine stops: %r", exc)
                    self._refuse_until_exit()
                    return
            self._deliver_all(outputs)

    def _refuse_until_exit(self) -> None:
        """After an engine fault: end every request still arriving with the fault (a
        submit may have raced the stop), until asked to exit."""
        assert self._fault is not None
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
                    for seq, stream in payload:
                        out = RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids)
                        out.finished, out.finish_reason, out.error = True, "error", self._fault
                        stream.put_threadsafe(out)
                    with self._lock:
                        self._num_submitted_not_queued -= len(payload)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out)
        self._publish_stats()

    def _fail_everything(self, exc: Exception) -> list[RequestOutput]:
        logger.exception("engine loop failed; failing every request in flight")
        message = f"the engine failed: {type(exc).__name__}: {exc}"
        try:
            return self.engine.fail(self.engine.request_ids(), message)
        except Exception:
            logger.exception("could not fail the requests cleanly; ending their streams")
            outputs = []
            for request_id in list(self._streams):
                out = RequestOutput(request_id, None, [])
                out.finished, out.finish_reason, out.error = True, "error", message
                outputs.append(out)
            return outputs

    def _run_commands(self) -> bool:
        """Apply queued adds and aborts; False once asked to exit."""
        changed = False
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            if command == "add":
                for seq, stream in payload:
                    self._add(seq, stream)
                with self._lock:
                    self._num_submitted_not_queued -= len(payload)
            elif command == "abort":
                self._abort(payload)
            elif command == "fail_all":
                for out in self.engine.fail(self.engine.request_ids(), payload):
                    self._deliver(out)
            elif command == "exit":
                for request_id in self.engine.request_ids():
                    self._abort(request_id)
                self._publish_stats()
                return False
        if changed:
            self._publish_stats()
        return True

    def _add(self, seq: EngineSequence, stream: RequestStream) -> None:
        try:
            self.engine.enqueue(seq)
        except Exception as exc:  # a duplicate id, say: end this stream with the error
            out = RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids)
            out.finished, out.finish_reason, out.error = True, "error", str(exc)
            stream.put_threadsafe(out)
            return
        self._streams[seq.request_id] = stream

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        stream.put_threadsafe(out)

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self.stats_snapshot = stats
