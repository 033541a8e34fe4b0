"""AsyncEngine: drives one LLMEngine from a background thread for asyncio front ends.

The engine thread owns the LLMEngine and runs the EngineLoop (core/loop.py): it alone
calls `step`, `enqueue` and `abort`. The asyncio side hands it commands through the
loop's thread-safe queue and receives each request's outputs on its RequestStream, so
the event loop never waits on a step. Tokenization runs on one worker thread
(`prepare`), off both the loop and the engine. For the engine in a process of its own,
see core/client.py (ProcessEngine); this one lets tests reach the LLMEngine object.

Invariants:
- A request's stream ends with exactly one finished output (stop, length, abort or
  error); after it the engine holds no blocks for that request.
- Closing the RequestStream of an unfinished request (a client that went away)
  aborts it; the engine thread frees its blocks before its next step.
- An exception that escapes a step fails every request in flight, and the loop goes on;
  after an engine fault (out of memory, a device fault) the loop stops: /health is 503.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from strata.engine.core.loop import EngineLoop
from strata.engine.engine import LLMEngine
from strata.engine.front import EngineFront, EngineStoppedError, QueueFullError, RequestStream
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence as EngineSequence

__all__ = ["AsyncEngine", "EngineStoppedError", "QueueFullError", "RequestStream"]


class AsyncEngine(EngineFront):
    """Build an LLMEngine on the engine thread and serve it to asyncio callers.

    The engine is built on the thread that steps it: on CPU, torch work split across
    threads makes each one's OpenMP pool contend with the others' (a 2x slowdown measured
    on 2 cores), so loading and stepping share one thread.
    """

    def __init__(
        self, make_engine: Callable[[], LLMEngine], max_waiting_requests: int | None = None
    ) -> None:
        super().__init__(max_waiting_requests)
        self._loop = _ThreadLoop(self)
        self._engine: LLMEngine | None = None
        self._thread = threading.Thread(
            target=self._main, args=(make_engine,), name="strata-engine", daemon=True
        )
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> LLMEngine:
        """Block until the engine is built; re-raises the error if building failed."""
        self._wait_for_load(timeout)
        assert self._engine is not None
        return self._engine

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("the engine has not loaded yet")
        return self._engine

    @property
    def tokenizer(self) -> Any | None:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def check_text_length(self, num_chars: int, param: str = "prompt") -> None:
        self.engine.requests.check_text_length(num_chars, param)

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

    def shutdown(self) -> None:
        """Stop the engine thread after aborting whatever is still in flight."""
        self._stopping = True
        self._send("exit", None)
        self._thread.join(timeout=30)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """The engine thread runs and no engine fault has stopped it."""
        return self._thread.is_alive() and self._fault is None

    def _send(self, command: str, payload: Any) -> None:
        self._loop.send(command, payload)

    def _send_add(self, seqs: Sequence[EngineSequence], streams: list[RequestStream]) -> None:
        self._send("add", list(zip(seqs, streams, strict=True)))

    # ---- engine thread --------------------------------------------------------------------

    def _main(self, make_engine: Callable[[], LLMEngine]) -> None:
        try:
            self._engine = make_engine()
            self._set_stats(self._engine.stats(), 0)
        except BaseException as exc:
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        try:
            self._loop.run(self._engine)
        finally:
            self._engine.close()


class _ThreadLoop(EngineLoop[RequestStream]):
    """The engine loop on AsyncEngine's thread: outputs go straight onto the streams."""

    def __init__(self, owner: AsyncEngine) -> None:
        super().__init__()
        self._owner = owner

    def deliver(self, outputs: list[tuple[RequestStream, RequestOutput]]) -> None:
        for stream, out in outputs:
            stream.put_threadsafe(out)

    def publish(self, stats: dict[str, Any], num_added: int) -> None:
        self._owner._set_stats(stats, num_added)

    def on_fault(self, message: str) -> None:
        self._owner._on_fault(message)
