"""GrammarMasks: the step's token bitmasks for its grammar-constrained rows, on the device.

    rows        | r0 (json) | r1 (free) | r2 (regex) |
    bitmask     |  filled   |  unread   |  filled    |   int32 [rows, ceil(vocab / 32)]
    logits      -inf wherever a row's bit is 0, applied by xgrammar's kernel, in place on a copy

A matcher's work (accepting the sampled token, then filling the next mask) stays off the
step's serial path:

    step N synced     engine: finishing decides from the token alone (a stop token ends a
                      grammar: the mask allowed it only where the grammar may end)
                      engine -> advance(sequences that go on): each matcher accepts its
                          new tokens (one batch call, here), then a worker thread fills
                          their rows of the host buffer (xgrammar fills without the GIL)
    step N+1          engine schedules, the runner launches the model, then build(rows):
                      waits for the worker, fills the rows it did not (a sequence's first
                      sampled token), uploads, and gathers them into sampling-row order

advance waits until the worker holds the GIL and is entering the fill. A thread woken
while the engine's thread runs Python gets the GIL only at the interpreter's next forced
switch (5 ms by default), so without the handover the fill would start only when the
engine's thread blocks, at the build: serially.

Constrained and unconstrained rows share one step and one sampler call; a row's mask
depends only on its own matcher.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from strata.engine.sequence import PENDING, Sequence

if TYPE_CHECKING:
    import xgrammar

    from strata.engine.grammar_compiler import GrammarCompiler

logger = logging.getLogger("strata.engine")

# id(sequence) -> (the sequence, its row of the host buffer), filled for the next build
FilledRows = dict[int, tuple[Sequence, int]]


@dataclass(frozen=True)
class GrammarMasks:
    rows: list[int] | torch.Tensor  # the constrained sampling rows (int32 on CUDA)
    bitmask: torch.Tensor  # int32 [all sampling rows, words], on the logits' device
    vocab: int = 0  # ids the bitmask covers; a constrained row's ids past it are banned

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] -> a copy with disallowed tokens at -inf."""
        import xgrammar

        masked = logits.clone()
        covered = min(self.vocab or logits.shape[-1], logits.shape[-1])
        # xgrammar's CUDA (Triton) path takes the rows as a tensor; its hint says list only
        rows: Any = self.rows
        xgrammar.apply_token_bitmask_inplace(masked, self.bitmask, vocab_size=covered, indices=rows)
        if covered < logits.shape[-1]:  # the model's padding past the tokenizer
            index = rows.long() if isinstance(rows, torch.Tensor) else torch.tensor(rows)
            # index_fill_ on the padding's view: advanced-index assignment syncs on CUDA
            masked[:, covered:].index_fill_(0, index, float("-inf"))
        return masked


class GrammarMaskBuilder:
    """Accepts tokens and fills masks for the constrained sequences (one batch matcher).

    Rows live in one host buffer (pinned on CUDA) that outlives the builder's steps. The
    worker writes it only between a step's host sync and the next build, and a build's
    upload is ordered before that sync, so no copy reads a row being written. A step's
    masks are valid until the next advance."""

    def __init__(
        self, device: torch.device, fill_threads: int = 0, accept_on_worker: bool = False
    ) -> None:
        self.device = device
        self.fill_threads = fill_threads  # xgrammar's batch fill threads; 0: its default
        self.accept_on_worker = accept_on_worker  # the matchers accept on the worker too
        self._cuda = device.type == "cuda"
        self._batch: xgrammar.BatchGrammarMatcher | None = None
        self._host: torch.Tensor | None = None  # [capacity, words]
        self._row_map: torch.Tensor | None = None  # pinned [capacity]: sampling row -> host row
        self._rows: torch.Tensor | None = None  # pinned [capacity]: the constrained rows
        self._words = 0
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[FilledRows] | None = None
        self._started = threading.Event()  # the worker has the GIL and enters a fill
        self.grammars: GrammarCompiler | None = None  # their ids cover (the engine sets it)
        self.late_rows = 0  # rows a build filled itself (the worker had not): first tokens
        self.worker_seconds: list[float] = []  # each advance's fill, on the worker

    def advance(self, seqs: list[Sequence]) -> None:
        """The next masks of constrained `seqs` (each has just sampled a token and goes
        on): their matchers accept the new tokens now; a worker fills their rows."""
        self._take_job()
        if not seqs or not self._words:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-grammar")
        self._started.clear()
        if self.accept_on_worker:
            new = _new_tokens(seqs)  # here: the engine appends to token_ids meanwhile
            self._reserve(len(seqs))
            self._job = self._pool.submit(self._timed_accept_fill, seqs, new)
            self._started.wait()
            return
        filled, matchers, indices = self._accept(seqs, 0)
        if not matchers:
            self._job = Future()
            self._job.set_result(filled)
            return
        self._job = self._pool.submit(self._timed_fill, filled, matchers, indices)
        self._started.wait()

    def build(self, seqs: list[Sequence], vocab: int) -> GrammarMasks | None:
        """Masks for sampling rows `seqs` of logits [rows, vocab]; None when no row is
        constrained."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        if self.grammars is not None:
            vocab = min(self.grammars.grammar_vocab, vocab)
        self._words = -(-vocab // 32)
        filled = self._take_job()
        late = [
            s
            for s in (seqs[i] for i in rows)
            if (entry := filled.get(id(s))) is None
            or entry[0] is not s
            or s.grammar_accepted != s.num_known_output_tokens
        ]
        if late:
            self.late_rows += len(late)
            filled.update(self._accept_and_fill(late, len(filled)))
        row_map = [filled[id(s)][1] if s.grammar is not None else 0 for s in seqs]
        host = self._host
        assert host is not None
        if not self._cuda:
            return GrammarMasks(rows, host[torch.tensor(row_map)], vocab)
        used = max(row_map) + 1
        row_map_host, rows_host = self._pinned_index(len(seqs))
        row_map_host.numpy()[: len(seqs)] = row_map
        rows_host.numpy()[: len(rows)] = rows
        uploaded = host[:used].to(self.device, non_blocking=True)
        row_map_dev = row_map_host[: len(seqs)].to(self.device, non_blocking=True)
        rows_dev = rows_host[: len(rows)].to(self.device, non_blocking=True)
        return GrammarMasks(rows_dev, uploaded.index_select(0, row_map_dev), vocab)

    def close(self) -> None:
        self._take_job()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _take_job(self) -> FilledRows:
        """The rows the worker filled for this build ({} when none): waits for it."""
        job, self._job = self._job, None
        return {} if job is None else job.result()

    def _timed_fill(
        self, filled: FilledRows, matchers: list[xgrammar.GrammarMatcher], indices: list[int]
    ) -> FilledRows:
        self._started.set()
        start = time.perf_counter()
        self._fill(matchers, indices)
        self._worker_took(start)
        return filled

    def _timed_accept_fill(self, seqs: list[Sequence], new: list[list[int]]) -> FilledRows:
        self._started.set()
        start = time.perf_counter()
        filled, matchers, indices = self._accept(seqs, 0, new)
        self._fill(matchers, indices)
        self._worker_took(start)
        return filled

    def _worker_took(self, start: float) -> None:
        self.worker_seconds.append(time.perf_counter() - start)
        del self.worker_seconds[:-1024]  # the recent ones

    def _accept_and_fill(self, seqs: list[Sequence], first_row: int) -> FilledRows:
        filled, matchers, indices = self._accept(seqs, first_row)
        self._fill(matchers, indices)
        return filled

    def _fill(self, matchers: list[xgrammar.GrammarMatcher], indices: list[int]) -> None:
        if matchers:
            assert self._batch is not None and self._host is not None
            self._batch.batch_fill_next_token_bitmask(matchers, self._host, indices=indices)

    def _accept(
        self, seqs: list[Sequence], first_row: int, new: list[list[int]] | None = None
    ) -> tuple[FilledRows, list[xgrammar.GrammarMatcher], list[int]]:
        """Each matcher of `seqs` accepts its sequence's new output tokens (`new`, or read
        here); host row first_row + i is its row, to be filled by the matchers returned
        (with their rows). A matcher that rejects a token (an engine fault: the mask
        allowed it) gets a row of its stop tokens only, here, so its sequence ends at the
        next step."""
        import xgrammar

        if self._batch is None:
            threads: int | str = self.fill_threads or "auto"
            self._batch = xgrammar.BatchGrammarMatcher(threads)  # type: ignore[arg-type]
        host = self._reserve(first_row + len(seqs))
        rows = range(first_row, first_row + len(seqs))
        filled: FilledRows = {id(seq): (seq, row) for seq, row in zip(seqs, rows, strict=True)}
        accepted = _feed(seqs, _new_tokens(seqs) if new is None else new)
        matchers, indices = [], []
        for seq, row, ok in zip(seqs, rows, accepted, strict=True):
            matcher = seq.grammar
            assert matcher is not None
            if ok:
                matchers.append(matcher)
                indices.append(row)
            else:
                host[row] = 0
                for stop in matcher.stop_token_ids:
                    host[row, stop // 32] |= _bit(stop % 32)
        return filled, matchers, indices

    def _reserve(self, rows: int) -> torch.Tensor:
        """The host buffer, grown (its rows kept) to hold `rows` rows."""
        held = self._host
        if held is not None and held.shape[0] >= rows and held.shape[1] == self._words:
            return held
        capacity = max(rows, 64, 0 if held is None else 2 * held.shape[0])
        grown = torch.empty((capacity, self._words), dtype=torch.int32, pin_memory=self._cuda)
        if held is not None and held.shape[1] == self._words:
            grown[: held.shape[0]] = held
        self._host = grown
        return grown

    def _pinned_index(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._row_map is None or self._row_map.shape[0] < rows:
            capacity = max(rows, 64)
            self._row_map = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            self._rows = torch.empty(capacity, dtype=torch.int32, pin_memory=True)
        assert self._rows is not None
        return self._row_map, self._rows


def _new_tokens(seqs: list[Sequence]) -> list[list[int]]:
    """Each sequence's output tokens its matcher has not accepted (counted as accepted
    from here on)."""
    new = []
    for seq in seqs:
        first = len(seq.prompt_token_ids) + seq.grammar_accepted
        tokens = seq.token_ids[first:]
        if tokens and tokens[-1] == PENDING:  # sampled on the device, not seen yet
            tokens.pop()
        seq.grammar_accepted += len(tokens)
        new.append(tokens)
    return new


def _feed(seqs: list[Sequence], new: list[list[int]]) -> list[bool]:
    """Each matcher accepts its sequence's `new` tokens (one batch call for those with a
    single new token, the usual case); False where it rejects one."""
    import xgrammar

    ok = [True] * len(seqs)
    single: list[int] = []
    for i, (seq, tokens) in enumerate(zip(seqs, new, strict=True)):
        if len(tokens) == 1:
            single.append(i)
            continue
        matcher = seq.grammar
        assert matcher is not None
        ok[i] = all(matcher.accept_token(token) for token in tokens)
    if single:
        matchers = [seqs[i].grammar for i in single]
        tokens = [new[i][0] for i in single]
        results = xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens)  # type: ignore[arg-type]
        for i, accepted in zip(single, results, strict=True):
            ok[i] = accepted
    for seq, accepted in zip(seqs, ok, strict=True):
        if not accepted:
            logger.error("%s: the grammar rejected a sampled token", seq.request_id)
    return ok


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i
