"""Long-document QA: TTFT of a question whose document is recomputed, cached in the GPU
pool, or loaded from the cpu, disk or remote tier.

    engine 1  cpu (+disk, +remote) tiers      per document:
                                                q0 cold ............ recompute
                                                write-through finished
                                                q0..q(Q-1) ......... gpu (pool hit)
                                                evict GPU cache, q0  cpu
              close: write-through to disk and remote finished
    engine 2  fresh, same disk dir            page cache warmed: first document of each
              (empty cpu tier)                length, q0 ......... disk-warm
                                              page cache dropped: the others, q0 ... disk-cold
    engine 3  fresh, only the remote          first document of each length, q0 ... remote

Every q0 answer is compared with the recomputed one (greedy: same tokens expected).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from strata.bench.tiers_measure import (
    Answer,
    ask,
    cold_gpu,
    delta,
    drop_page_cache,
    flush,
    summary_stats,
    tier_counters,
    warm_page_cache,
)
from strata.bench.tiers_workloads import Document, random_ids
from strata.engine.llm import LLM

logger = logging.getLogger("strata.bench.tiers")

SOURCES = ("recompute", "gpu", "cpu", "disk-warm", "disk-cold", "remote")


@dataclass
class QAMeasure:
    source: str
    doc: str
    length: int
    question: int
    ttft_ms: float
    cached_tokens: int
    matches_recompute: bool | None  # None: no recomputed answer to compare with
    counters: dict[str, float] = field(default_factory=dict)  # tier stat deltas

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QAResult:
    measures: list[QAMeasure] = field(default_factory=list)
    engine_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


MakeLLM = Callable[..., LLM]


class DocQA:
    """Runs the engines above in turn; `make_llm(**tier_kwargs)` builds one engine."""

    def __init__(
        self,
        make_llm: MakeLLM,
        docs: list[Document],
        max_tokens: int,
        disk_dir: str | None,
        remote: str | None,
    ) -> None:
        self.make_llm = make_llm
        self.docs = docs
        self.max_tokens = max_tokens
        self.disk_dir = disk_dir
        self.remote = remote
        self.reference: dict[str, list[int]] = {}  # doc -> recomputed q0 answer
        self.result = QAResult()

    def run(self) -> QAResult:
        self._run_first()
        if self.disk_dir is not None:
            self._run_disk()
        if self.remote is not None:
            self._run_remote()
        return self.result

    # ---- one measured question ----------------------------------------------------------

    def _measure(self, llm: LLM, source: str, doc: Document, j: int) -> Answer:
        before = tier_counters(llm)
        answer = ask(llm, doc.question(j), self.max_tokens)
        counters = delta(tier_counters(llm), before)
        ref = self.reference.get(doc.name) if j == 0 else None
        matches = None if ref is None or source == "recompute" else answer.token_ids == ref
        self.result.measures.append(
            QAMeasure(
                source,
                doc.name,
                doc.length,
                j,
                answer.ttft_s * 1e3,
                answer.cached_tokens,
                matches,
                counters,
            )
        )
        logger.info(
            "%-9s %-12s q%d TTFT %8.1f ms, %d cached tokens%s",
            source,
            doc.name,
            j,
            answer.ttft_s * 1e3,
            answer.cached_tokens,
            "" if matches is None else f", matches recompute: {matches}",
        )
        return answer

    def _warm_up(self, llm: LLM, longest: bool) -> None:
        """A recompute, then a tier load, of a short prompt (and of the longest one for the
        first engine, which compiles the kernels of the process), untimed."""
        vocab = llm.engine.model_config.vocab_size
        rng = random.Random(12345)
        longest_question = max(d.length for d in self.docs) + len(self.docs[0].suffixes[0])
        lengths = [min(64, longest_question)]
        if longest:
            lengths.insert(0, longest_question)
        for n in lengths:
            prompt = random_ids(rng, n, vocab)
            ask(llm, prompt, self.max_tokens)
            cold_gpu(llm)
            ask(llm, prompt, self.max_tokens)  # from a tier when there is one
        cold_gpu(llm)

    # ---- engines ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _engine(
        self, name: str, disk_dir: str | None, remote: str | None, longest: bool
    ) -> Iterator[LLM]:
        """An engine over these lower tiers, warmed up; once the block ran, its bookkeeping
        is checked, and it is closed (its stats kept as `name`) however the block ended."""
        llm = self.make_llm(kv_disk_dir=disk_dir, kv_remote=remote)
        try:
            self._warm_up(llm, longest=longest)
            yield llm
            llm.check_integrity()
        finally:
            self._close(llm, name)

    def _measure_cold(self, llm: LLM, source: str, doc: Document) -> Answer:
        """q0 of `doc` with the GPU prefix cache emptied first."""
        cold_gpu(llm)
        return self._measure(llm, source, doc, 0)

    def _run_first(self) -> None:
        with self._engine("first", self.disk_dir, self.remote, longest=True) as llm:
            for doc in self.docs:
                answer = self._measure_cold(llm, "recompute", doc)
                self.reference[doc.name] = answer.token_ids
                flush(llm)  # a pool hit timed apart from the write-through draining beside it
                for j in range(len(doc.suffixes)):
                    self._measure(llm, "gpu", doc, j)
                self._measure_cold(llm, "cpu", doc)

    def _run_disk(self) -> None:
        assert self.disk_dir is not None
        with self._engine("disk", self.disk_dir, None, longest=False) as llm:
            firsts = self._first_of_each_length()
            rest = [d for d in self.docs if d not in firsts]
            warmed = warm_page_cache(self.disk_dir)
            self.result.notes.append(
                f"disk-warm: every block file ({warmed / 2**30:.2f} GiB) read once before, so "
                "reads come from the OS page cache"
            )
            for doc in firsts:
                self._measure_cold(llm, "disk-warm", doc)
            if rest and drop_page_cache(self.disk_dir):
                self.result.notes.append(
                    "disk-cold: os.sync() then posix_fadvise(POSIX_FADV_DONTNEED) on every block "
                    "file before the first disk-cold question (the guest's page cache; a "
                    "virtual disk may still be cached by its host)"
                )
                for doc in rest:
                    self._measure_cold(llm, "disk-cold", doc)

    def _run_remote(self) -> None:
        with self._engine("remote", None, self.remote, longest=False) as llm:
            for doc in self._first_of_each_length():
                self._measure_cold(llm, "remote", doc)

    def _first_of_each_length(self) -> list[Document]:
        lengths = sorted({d.length for d in self.docs})
        return [next(d for d in self.docs if d.length == n) for n in lengths]

    def _close(self, llm: LLM, name: str) -> None:
        flush(llm)
        self.result.engine_stats[name] = summary_stats(llm)
        llm.close()
