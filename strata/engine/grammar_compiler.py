"""GrammarCompiler: StructuredOutput -> xgrammar's compiled grammar, off the engine thread,
cached by spec.

Compiles run on the compiler's own worker threads; a request waits for its grammar in
`prepare` (on the caller's thread, the server's tokenizer thread), never in a step, so
the engine keeps stepping other requests meanwhile. Requests with an equal spec share
one compile (the cache holds the future, so concurrent requests wait for the same one).
A spec xgrammar cannot compile raises InvalidRequestError with xgrammar's reason.
JSON is generated without free whitespace (a small model given any whitespace can loop
on newlines until max_tokens); its separators are ", " and ": ".
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any

from strata.engine.structured_output import StructuredOutput
from strata.errors import InvalidRequestError

if TYPE_CHECKING:
    import xgrammar


class GrammarCompileError(InvalidRequestError):
    """xgrammar could not compile a structured output's spec; the message says why."""


class GrammarCompiler:
    MAX_CACHED = 512

    def __init__(
        self, tokenizer: Any | None, vocab_size: int, eos_token_ids: Collection[int],
        threads: int = 2,
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="strata-grammar")
        self._lock = threading.Lock()  # guards the cache
        self._build_lock = threading.Lock()  # guards building the xgrammar compiler
        self._cache: OrderedDict[StructuredOutput, Future[xgrammar.CompiledGrammar]] = OrderedDict()
        self._compiler: xgrammar.GrammarCompiler | None = None

    @cached_property
    def grammar_vocab(self) -> int:
        """The ids grammars cover: the tokenizer's, when the model pads its vocabulary past
        them (xgrammar's matchers slow down with every padded id; the masks ban the
        padding, grammar_mask.py). Read on first use: the vocabulary takes a moment."""
        if self.tokenizer is None:
            return self.vocab_size
        return min(self.vocab_size, max(self.tokenizer.get_vocab().values()) + 1)

    def _xgr_compiler(self) -> xgrammar.GrammarCompiler:
        """Built on first use, on a compile thread: reading the vocabulary takes a moment
        (never on the caller's thread, which may be an event loop)."""
        with self._build_lock:
            return self._build()

    def _build(self) -> xgrammar.GrammarCompiler:
        assert self.tokenizer is not None  # submit() refuses models without one
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.grammar_vocab, stop_token_ids=self.eos_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def submit(self, spec: StructuredOutput) -> Future[xgrammar.CompiledGrammar]:
        """Start compiling `spec` (or find it compiled or compiling)."""
        if self.tokenizer is None:
            raise InvalidRequestError(
                "structured outputs need a model with a tokenizer", "response_format"
            )
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            if len(self._cache) > self.MAX_CACHED:
                self._cache.popitem(last=False)
            return future

    def prefetch(self, specs: Iterable[StructuredOutput | None]) -> None:
        """Start compiling every spec now, so that a batch's distinct grammars compile in
        parallel rather than one by one as each request is prepared."""
        for spec in specs:
            if spec is not None and self.tokenizer is not None:
                self.submit(spec)

    def compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """The compiled grammar; InvalidRequestError if xgrammar rejects the spec."""
        future = self.submit(spec)
        try:
            return future.result()
        except InvalidRequestError:
            self._forget(spec, future)
            raise

    async def compile_async(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """compile() for asyncio callers: the event loop waits without blocking."""
        future = self.submit(spec)
        try:
            return await asyncio.wrap_future(future)
        except InvalidRequestError:
            self._forget(spec, future)
            raise

    def _forget(self, spec: StructuredOutput, future: Future[Any]) -> None:
        """A rejected spec is not kept: it would only ever fail again the same way."""
        with self._lock:
            if self._cache.get(spec) is future:
                del self._cache[spec]

    def matcher(self, spec: StructuredOutput) -> xgrammar.GrammarMatcher:
        """A fresh matcher at the start of the grammar."""
        import xgrammar

        return xgrammar.GrammarMatcher(self.compile(spec))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        return _compile(self._xgr_compiler(), spec)


def _compile(
    compiler: xgrammar.GrammarCompiler, spec: StructuredOutput
) -> xgrammar.CompiledGrammar:
    param = {"json": "response_format", "json_object": "response_format"}.get(
        spec.kind, f"guided_{spec.kind}"
    )
    try:
        if spec.kind == "json":
            return compiler.compile_json_schema(
                spec.spec, strict_mode=spec.strict, any_whitespace=False
            )
        if spec.kind == "json_object":
            return compiler.compile_json_schema(
                '{"type": "object"}', strict_mode=False, any_whitespace=False
            )
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        if spec.kind == "choice":
            options = " | ".join(json.dumps(c) for c in spec.choices)
            return compiler.compile_grammar(f"root ::= {options}")
        return compiler.compile_grammar(spec.spec)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrammarCompileError(
            f"the {spec.kind} structured output could not be compiled: {reason}", param
        ) from exc
