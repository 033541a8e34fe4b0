"""ModelRunner: turns a StepPlan into tensors, runs the model and samples.

Per step it builds, for the flat batch of the plan's chunks in order:
    input_ids, positions, slot_mapping  [tokens]
    logits_rows                         [sampling chunks]  last token of each such chunk,
                                        then the prompt positions to score (prompt_logprobs.py)
and the attention backend's metadata from the chunks' block tables. Host-side arrays go
through persistent pinned buffers (staging.py) in one non-blocking copy per dtype; the
step's only host sync is the caller's read of the sampled tokens.

A decode-only step (every chunk one token that samples) replays a CUDA graph when graphs
were captured (cuda_graphs.py) and its batch fits; so does a step whose every row is a
recall sequence decoding through its page, once the same rows decode twice in a row
(kv/recall/step_graphs.py); other steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from strata.attention.backend import AttentionBackend, StepMetadata
from strata.engine.cuda_graphs import DecodeGraphs
from strata.engine.feed import FeedGather, FeedRows
from strata.engine.grammar_mask import GrammarMaskBuilder
from strata.engine.logits_adjust import build_adjustment
from strata.engine.overlap import SampledStep, sampling_seqs
from strata.engine.plan import StepPlan
from strata.engine.prompt_logprobs import PromptRows
from strata.engine.sampler import Sampler, SamplerOutput, SamplingBatch, check_sampling_row
from strata.engine.sequence import Sequence
from strata.engine.staging import PinnedStager
from strata.engine.step_stats import StepStats
from strata.engine.tp.parallel import TensorParallel
from strata.engine.tp.step_wire import StepInputs
from strata.errors import SequenceFault, blame
from strata.kv.cache import KVCache
from strata.kv.policies.runtime.gathered import GatheredObserver, ObservedRows
from strata.kv.policies.runtime.observer import StepObserver
from strata.kv.policies.runtime.step_kv import KVStepBuilder, StepKV, layer_metadata
from strata.kv.recall.attention import RecallAttention, RecallMetadata
from strata.kv.recall.page_decode import page_steps
from strata.kv.recall.step_graphs import RecallStepGraphs
from strata.kv.recall.wire import encode_rows
from strata.models.llama import LlamaModel


@dataclass(frozen=True)
class PreparedSampling:
    """A step's sampling rows, ready for their grammar masks and the sampler."""

    logits: torch.Tensor  # [rows, vocab] float32
    seqs: list[Sequence]  # row i's sequence
    batch: SamplingBatch  # without grammar masks


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv: KVCache, backend: AttentionBackend[Any], device: torch.device
    ) -> None:
        """backend: what the model attends over `kv` with; under a lossy KV codec, the
        CodedAttention around the named backend (strata/kv/coded_attention.py)."""
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.sampler = Sampler()
        self._ints = PinnedStager(device, torch.long)
        self._floats = PinnedStager(device, torch.float32)
        self.grammar_masks = GrammarMaskBuilder(device)
        self.kv_step = KVStepBuilder(kv)  # slots, layouts and observer under KV policies
        self.recall_attention = RecallAttention(backend)  # steps with recall sequences
        self.graphs: DecodeGraphs | None = None
        self.recall_graphs: RecallStepGraphs | None = None  # whole recall decode steps
        self.parallel: TensorParallel | None = None  # set when the model is sharded
        self.step_log: list[StepStats] | None = None  # set to a list to record steps

    def capture_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture decode graphs for batch sizes up to max_batch (CUDA, graph-safe backend)."""
        self.graphs = DecodeGraphs(
            self.model, self.kv, self.backend, self.device, max_batch, max_model_len
        )

    def execute(self, plan: StepPlan) -> tuple[StepPlan, SamplerOutput | None]:
        """Run one step. Returns the plan it ran and the sampled tokens for that plan's
        sampling chunks, in order; prompt logprobs the step computes are recorded on their
        sequences.

        A request whose own parameters or KV policy raise before the model runs is left
        out of the plan it returns (its fault in `plan.faults`); one whose policy raises
        while observing stays in it, with its fault recorded (see StepPlan)."""
        plan, logits = self.launch(plan)
        return plan, self.sample(plan, logits)

    def launch(
        self, plan: StepPlan, feed: SampledStep | None = None
    ) -> tuple[StepPlan, torch.Tensor | None]:
        """The first half of `execute`: the model's kernels, queued. Returns the plan it
        ran and its logits (None when no row needs them). A position whose token is still
        PENDING takes its id from `feed`, the step in flight that sampled it."""
        while True:
            try:
                self._check_sampling_rows(plan)
                return plan, self.compute_logits(plan, feed)
            except SequenceFault as fault:
                plan = plan.without(fault)
                if plan.is_empty:
                    return plan, None

    def sample(
        self, plan: StepPlan, logits: torch.Tensor | None, keep: list[int] | None = None
    ) -> SamplerOutput | None:
        """The second half of `execute`: record the plan's prompt logprobs and sample its
        rows (sampling_seqs(plan)); only rows `keep` if given."""
        prepared = self.prepare_sampling(plan, logits, keep)
        return None if prepared is None else self.sample_prepared(prepared)

    def prepare_sampling(
        self, plan: StepPlan, logits: torch.Tensor | None, keep: list[int] | None = None
    ) -> PreparedSampling | None:
        """`sample` up to the grammar masks: the prompt logprobs recorded and the sampling
        batch built from the sequences as they are now (their output so far); None when
        no row is sampled. The engine may append to the sequences before sample_prepared."""
        if logits is None:
            return None
        rows = sampling_seqs(plan)
        prompt = PromptRows.of(plan)
        if prompt is not None:
            prompt.record(logits[len(rows) :])
        seqs = list(rows)
        if keep is not None:
            index = torch.from_numpy(np.asarray(keep, np.int64))  # no sync: pageable, async
            logits = logits.index_select(0, index.to(logits.device, non_blocking=True))
            seqs = [rows[i] for i in keep]
        if not seqs:
            return None
        # Host work from here on (masks included) overlaps the model's kernels on a GPU.
        return PreparedSampling(logits[: len(seqs)], seqs, self._sampling_batch(seqs))

    def sample_prepared(self, prepared: PreparedSampling) -> SamplerOutput:
        """Sample a prepared batch: its grammar masks (from the tokens the host has seen),
        then the sampler's kernels."""
        logits, seqs = prepared.logits, prepared.seqs
        masks = self.grammar_masks.build(seqs, logits.shape[-1])
        batch = prepared.batch if masks is None else replace(prepared.batch, grammar=masks)
        return self.sampler(logits, batch)

    def _check_sampling_rows(self, plan: StepPlan) -> None:
        """SequenceFault for the first sampling request whose values do not fit the batch."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if chunk.samples and not seq.sampling_checked:  # its values never change
                with blame(seq.request_id):
                    check_sampling_row(seq.params, seq.seed)
                seq.sampling_checked = True

    def compute_logits(
        self, plan: StepPlan, feed: SampledStep | None = None
    ) -> torch.Tensor | None:
        """Run the model for one step; float32 logits of the sampling chunks, in order,
        then of the prompt positions to score (PromptRows.of(plan).rows). PENDING tokens
        are gathered from `feed` on the device.

        From a graph replay the logits are a view valid until the next step. Raises
        SequenceFault, before the model runs, for a request whose KV policy raised."""
        graphs = self.graphs
        if (
            graphs is not None
            and len(plan.chunks) <= graphs.max_batch
            and all(
                c.num_tokens == 1 and c.samples and c.seq.kv is None and c.seq.recall is None
                for c in plan.chunks
            )
        ):
            if self.step_log is not None:
                self.step_log.append(StepStats.of(plan, graph=True))
            return self._replay(graphs, plan, feed)
        if self.step_log is not None:
            self.step_log.append(StepStats.of(plan, graph=False))
        ids: list[int] = []
        positions: list[np.ndarray] = []
        logits_rows: list[int] = []
        gather = FeedRows()
        offset = 0
        for chunk in plan.chunks:
            seq = chunk.seq
            ids.extend(seq.token_ids[chunk.start : chunk.end])
            positions.append(np.arange(chunk.start, chunk.end, dtype=np.int64))
            offset += chunk.num_tokens
            if chunk.samples:
                logits_rows.append(offset - 1)
                gather.add(feed, seq, offset - 1)
        prompt = PromptRows.of(plan)
        if prompt is not None:
            logits_rows.extend(prompt.rows)
        step = self.kv_step.build(plan)  # slot == position unless a policy evicted
        ids_array = np.asarray(ids, dtype=np.int64)
        ids_array[gather.rows] = 0  # PENDING: the feed's token replaces it on the device
        inputs = StepInputs(
            ids_array, np.concatenate(positions), step.slot_mapping,
            np.asarray(logits_rows, dtype=np.int64), step.layout,
            layer_layouts=tuple(step.layer_layouts), layer_of=np.asarray(step.layer_of, np.int64),
        )  # fmt: skip
        logits, observer = self._forward(step, inputs, plan, gather.on(feed))
        if observer is not None:
            plan.faults.extend(observer.faults.values())
        return logits if logits_rows else None

    def _forward(
        self, step: StepKV, inputs: StepInputs, plan: StepPlan, gather: FeedGather | None
    ) -> tuple[torch.Tensor, StepObserver | GatheredObserver | None]:
        """The model over the step's flat batch, and the observer it ran with; under tensor
        parallelism the workers get the same inputs first and run their shares alongside
        (strata/engine/tp), and a KV policy's scores are gathered (runtime/gathered.py)."""
        parts = [inputs.ids, inputs.positions, inputs.slots, inputs.logits_rows]
        if gather is not None:
            parts += [gather.rows, gather.sources]
        ids_t, pos_t, slot_t, rows_t, *feed_t = self._ints.upload(parts)
        if gather is not None:
            assert self.parallel is None, "the workers take their ids from rank 0's host"
            gather.apply(ids_t, *feed_t)
        inner = self._metadata(step, slot_t)
        backend: AttentionBackend[Any] = self.backend
        meta: StepMetadata
        if step.recall:
            backend, meta = self.recall_attention, self._recall_metadata(step, slot_t, inner)
        else:
            assert inner is not None, "a step without recall rows has pool rows"
            meta = inner
        if self.parallel is None:
            if isinstance(meta, RecallMetadata) and self.recall_graphs is not None:
                graphed = self.recall_graphs.forward(meta, ids_t, pos_t, inputs.logits_rows)
                if graphed is not None:
                    return graphed, step.observer
            logits = self.model(ids_t, pos_t, self.kv, backend, meta, rows_t, step.observer)
            return logits, step.observer
        if step.recall:  # the workers mirror rank 0's recall sequences (tp/worker_recall.py)
            inputs = replace(inputs, recall=encode_rows(step.recall))
        observer = None
        if step.observer is not None:
            observer, inputs = self._gathered(step.observer, inputs, plan)
        if self.kv.tails is not None:  # the workers' tail rows follow rank 0's open blocks
            live = sorted(self.kv.tails.live_blocks())
            inputs = replace(inputs, live_blocks=np.asarray(live, np.int64))
        self.parallel.send(inputs)
        with self.parallel.guard():
            return self.model(ids_t, pos_t, self.kv, backend, meta, rows_t, observer), observer

    def _gathered(
        self, local: StepObserver, inputs: StepInputs, plan: StepPlan
    ) -> tuple[GatheredObserver, StepInputs]:
        """The observer that gathers every rank's scores, and the inputs that tell the
        workers which queries to score."""
        assert self.parallel is not None
        pooled = [c for c in plan.chunks if c.seq.recall is None]  # the layout's chunks
        chunk_of = {c.seq.request_id: i for i, c in enumerate(pooled)}
        rows = [ObservedRows.of(s, chunk_of[s.request_id]) for s in local.observed]
        observer = GatheredObserver(
            self.kv, rows, inputs.layout.block_tables, self.parallel.comm,
            self.parallel.kv_head_slices, local.observed,
        )  # fmt: skip
        return observer, replace(inputs, observed=ObservedRows.encode(rows))

    def _recall_metadata(
        self, step: StepKV, slots: torch.Tensor, inner: StepMetadata | None
    ) -> RecallMetadata:
        assert step.ordinary_rows is not None
        ordinary = torch.from_numpy(step.ordinary_rows).to(self.device, non_blocking=True)
        pages = page_steps(step.recall, self.device)
        return RecallMetadata(slots, inner, ordinary, step.recall, pages)

    def _metadata(self, step: StepKV, slots: torch.Tensor) -> StepMetadata | None:
        """The backend's metadata for the step (None when it has no pool rows); one per
        distinct layer layout when KV policies give layers different KV (PyramidKV's
        budgets, attended blocks)."""
        if not step.layout.query_lens:
            return None
        if step.uniform:
            return self.backend.prepare(step.layout, slots, self.device)
        return layer_metadata(self.backend, step.layer_layouts, step.layer_of, self.device)

    def _replay(
        self, graphs: DecodeGraphs, plan: StepPlan, feed: SampledStep | None
    ) -> torch.Tensor:
        bs = self.kv.block_size
        positions = np.fromiter((c.start for c in plan.chunks), np.int64, len(plan.chunks))
        tables = [c.block_table for c in plan.chunks]
        slots = np.fromiter(
            (t[p // bs] * bs + p % bs for t, p in zip(tables, positions.tolist(), strict=True)),
            np.int64,
            len(tables),
        )
        ids = [c.seq.token_ids[c.start] for c in plan.chunks]
        gather = FeedRows()
        for row, chunk in enumerate(plan.chunks):
            gather.add(feed, chunk.seq, row)
        for row in gather.rows:
            ids[row] = 0  # PENDING: the feed's token replaces it on the device
        return graphs.run(ids, positions, slots, tables, gather.on(feed))

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """The batch of sampling rows `seqs` (each checked by _check_sampling_rows), without
        grammar masks (sample_prepared adds them)."""
        params = [s.params for s in seqs]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        floats = np.array([[p.temperature, p.top_p, p.min_p] for p in params], np.float32)
        temperature, top_p, min_p = self._floats.upload([floats.reshape(len(seqs), 3).T])[0]
        top_k, seed, step = self._ints.upload(
            [
                np.array(
                    [
                        [max(p.top_k, 0) for p in params],
                        [s.seed for s in seqs],
                        [s.num_output_tokens for s in seqs],
                    ],
                    np.int64,
                ).reshape(3, len(seqs))
            ]
        )[0]
        return SamplingBatch(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            step=step,
            all_greedy=all(p.greedy for p in params),
            any_top_p_or_k=any(p.top_p < 1.0 or p.top_k > 0 for p in params),
            max_logprobs=max(wanted, default=-1),
            min_p=min_p if any(p.min_p > 0 for p in params) else None,
            adjust=build_adjustment(seqs, self.device),
        )
