"""EngineFront: what an asyncio front end (the HTTP server) sees of an engine, wherever
the engine runs: on a thread of this process (AsyncEngine) or in a process of its own
(ProcessEngine, core/client.py).

A request is prepared (tokenized and checked: it raises if bad), then submitted; its
outputs arrive in order on its RequestStream. The front counts what it submitted and
the engine reports what it took in, with the stats that already count it, so the
waiting count never misses a request in transit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from strata.engine.outputs import RequestOutput, coalesce
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence as EngineSequence
from strata.errors import StrataError


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
        self, engine: EngineFront, request_id: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self.loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._held: RequestOutput | None = None  # taken from the queue, not yet returned

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The next output; outputs that queued up meanwhile (a consumer slower than the
        engine) come as one, with their deltas joined, so a stream never falls further
        behind one step at a time."""
        if self.finished:
            raise StopAsyncIteration
        out, self._held = self._held or await self._queue.get(), None
        while not out.finished and out.error is None and not self._queue.empty():
            later = self._queue.get_nowait()
            if later.error is not None:  # its own output: what came before is delivered
                self._held = later
                break
            out = coalesce(out, later)
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    def put(self, out: RequestOutput) -> None:
        """Called on the stream's event loop."""
        self._queue.put_nowait(out)

    def put_threadsafe(self, out: RequestOutput) -> None:
        """Called from another thread."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
            self.loop.call_soon_threadsafe(self._queue.put_nowait, out)


class EngineFront(ABC):
    """The asyncio side: submission, waiting counts, stopping; subclasses move the
    commands to the engine (`_send`, `_send_add`) and say what the engine is."""

    def __init__(self, max_waiting_requests: int | None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self._lock = threading.Lock()
        self._num_submitted = 0  # sequences submitted; the engine reports those it took in
        self._num_added = 0  # guarded by _lock, with stats_snapshot
        self._stopping = False
        self._fault: str | None = None  # set by an engine fault: the engine is unusable
        self.stats_snapshot: dict[str, Any] = {}
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="strata-tokenize")
        self._loaded = threading.Event()  # set once the engine has loaded or failed to
        self._load_error: BaseException | None = None

    # ---- what the engine is (subclasses) --------------------------------------------------

    @abstractmethod
    def wait_loaded(self, timeout: float | None = None) -> object:
        """Block until the engine has loaded; raises the error if loading failed."""
        raise NotImplementedError

    @property
    @abstractmethod
    def tokenizer(self) -> Any | None:
        raise NotImplementedError

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        raise NotImplementedError

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    @abstractmethod
    def alive(self) -> bool:
        """The engine runs and no engine fault has stopped it."""
        raise NotImplementedError

    @abstractmethod
    def check_text_length(self, num_chars: int, param: str = "prompt") -> None:
        """ContextLengthError if a text of num_chars characters cannot fit the context."""
        raise NotImplementedError

    @abstractmethod
    async def prepare(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str
    ) -> EngineSequence:
        """Tokenize and check a request; raises InvalidRequestError if it is bad."""
        raise NotImplementedError

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine after aborting whatever is still in flight."""
        raise NotImplementedError

    @abstractmethod
    def _send(self, command: str, payload: Any) -> None:
        raise NotImplementedError

    @abstractmethod
    def _send_add(self, seqs: Sequence[EngineSequence], streams: list[RequestStream]) -> None:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------

    def _wait_for_load(self, timeout: float | None) -> None:
        """Block until the engine has loaded; raises the error if loading failed."""
        if not self._loaded.wait(timeout):
            raise TimeoutError(f"the engine did not load within {timeout} s")
        if self._load_error is not None:
            raise self._load_error

    async def run_in_tokenizer_thread(self, fn: Any, *args: Any) -> Any:
        """Run tokenizer work (chat templates, say) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    def num_waiting(self) -> int:
        with self._lock:
            return self._num_waiting()

    def _num_waiting(self) -> int:
        return int(self.stats_snapshot["num_waiting"]) + self._num_submitted - self._num_added

    def submit(self, seqs: Sequence[EngineSequence]) -> list[RequestStream]:
        """Queue prepared sequences together (all or none) and return their output streams.

        Raises QueueFullError if they would overflow the waiting queue, and
        EngineStoppedError once `stop` was called.
        """
        if self._stopping:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        with self._lock:
            waiting = self._num_waiting()
            limit = self.max_waiting_requests
            if limit is not None and waiting + len(seqs) > limit:
                raise QueueFullError(
                    f"the waiting queue is full ({waiting} waiting, limit {limit}); retry later"
                )
            self._num_submitted += len(seqs)
        streams = [RequestStream(self, seq.request_id, loop) for seq in seqs]
        self._send_add(seqs, streams)
        return streams

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def fail_all(self, message: str) -> None:
        """Finish every request in flight with reason "error" and this message."""
        self._send("fail_all", message)

    def stop(self) -> None:
        """Refuse new requests; those in flight run to the end."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        """True once `stop` or `shutdown` was called: new requests are refused."""
        return self._stopping

    @property
    def num_in_flight(self) -> int:
        return int(self.stats_snapshot["num_running"]) + self.num_waiting()

    def _set_stats(self, stats: dict[str, Any], num_added: int) -> None:
        with self._lock:
            self.stats_snapshot = stats
            self._num_added = num_added

    def _on_fault(self, message: str) -> None:
        self._fault = message
        self._stopping = True
