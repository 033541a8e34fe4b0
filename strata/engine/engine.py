"""LLMEngine: one loop of schedule -> run -> sample -> update, shared by every front end.

The engine owns the requests it was given and the step loop; its parts are built by
engine/build.py, requests are checked by engine/requests.py, and sampled tokens become
outputs in engine/finishing.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from strata.config import EngineConfig
from strata.engine.build import build_engine_parts
from strata.engine.finishing import record_logprobs, request_output, stop_reason
from strata.engine.integrity import check_engine_integrity
from strata.engine.outputs import RequestOutput
from strata.engine.overlap import PENDING, LaunchedStep, SampledStep, resolve_overlap, sampling_seqs
from strata.engine.plan import StepPlan
from strata.engine.requests import RequestFactory
from strata.engine.runner import PreparedSampling
from strata.engine.sampler import SamplerOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence, SequenceStatus
from strata.errors import InvalidRequestError, is_engine_fault

logger = logging.getLogger("strata.engine")


class LLMEngine:
    # Recall sequences' steps overlap too (their host work follows only token counts, and
    # what a step writes for a row found finished a step late is released in stream
    # order). Off until a GPU run of gpu_recall_check.py has compared it; CPU tests pass.
    overlap_recall = False
    # Under the overlap, sample the step launched last time after scheduling the next one
    # (not before): the grammar masks of its constrained rows, filled on a worker from the
    # tokens just taken, get the scheduling's time to be ready. Off until a GPU run of
    # grammar_overhead.py (gpu_profiles.sh knobs) has compared the two orders; CPU tests
    # pass with both.
    sample_after_schedule = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.parts = parts = build_engine_parts(config)
        self.loaded, self.model_config = parts.loaded, parts.placed.model_config
        self.tokenizer = parts.loaded.tokenizer
        self.device, self.dtype = parts.placed.device, parts.placed.dtype
        self.max_model_len = parts.placed.max_model_len
        self.backend, self.codec, self.kv_cache = parts.backend, parts.codec, parts.kv_cache
        self.kv, self.tiers, self.sessions = parts.kv, parts.tiers, parts.sessions
        self.swap_cost, self.scheduler, self.runner = parts.swap_cost, parts.scheduler, parts.runner
        self.kv_policies, self.moe, self.rebalancer = parts.kv_policies, parts.moe, parts.rebalancer
        self.requests = RequestFactory(
            self.tokenizer, parts.loaded.name, self.model_config.vocab_size, self.max_model_len,
            self.kv_policies, config.seed, parts.loaded.eos_token_ids,
        )  # fmt: skip
        self.runner.grammar_masks.grammars = self.requests.grammars
        # Tokenize and check a request without queueing it (prepare), or only its prompt.
        self.prepare = self.requests.prepare
        self.encode_prompt, self.validate = self.requests.encode_prompt, self.requests.validate
        self._seqs: dict[str, Sequence] = {}
        self.overlap = resolve_overlap(config, self.device)
        logger.info(
            "overlap scheduling %s (overlap_scheduling %s): the host %s",
            "on" if self.overlap else "off", config.scheduler.overlap,
            "prepares step k+1 while the device runs step k" if self.overlap
            else "waits for each step's tokens before the next",
        )  # fmt: skip
        self._launched: LaunchedStep | None = None  # forward queued, not sampled
        self._to_sample: tuple[StepPlan, PreparedSampling] | None = None  # within a step
        self._sampled: SampledStep | None = None  # sampled, tokens on their way
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None,
        request_id: str | None = None, stream: bool = False,
    ) -> str:  # fmt: skip
        """Queue a request; raises InvalidRequestError (and queues nothing) if it is bad."""
        return self.enqueue(self.prepare(prompt, params, request_id, stream))

    def enqueue(self, seq: Sequence) -> str:
        """Queue a sequence made by `prepare`."""
        if seq.request_id in self._seqs:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        self.num_prompt_tokens += seq.num_prompt_tokens
        return seq.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and return its blocks to the pool. None if unknown."""
        return self._finish_now(request_id, "abort")

    def _finish_now(self, request_id: str, reason: str) -> RequestOutput | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.token_ids[-1] == PENDING:  # sampled by a step in flight: dropped
            seq.token_ids.pop()
        self.scheduler.finish(seq, reason)
        return request_output(seq, self.tokenizer)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns outputs of the requests that got a token.

        Under overlap scheduling (engine/overlap.py) a step's tokens come out of the next
        call, while the GPU runs the step after it.

        A request whose own work raises (its sampling parameters, its KV policy:
        errors.SequenceFault) is finished alone with reason "error" (its blocks freed, the
        message in `RequestOutput.error`); the step goes on for the others. Any other
        exception in the step fails the requests in it the same way, and the engine stays
        usable, except an engine fault (out of memory, a device fault,
        errors.is_engine_fault), which is raised.
        """
        self.sessions.expire()
        if self.rebalancer is not None:
            seqs = (*self.scheduler.running, *self.scheduler.waiting)
            self.rebalancer.step(
                (s.num_tokens for s in seqs), self.scheduler.num_preemptions, self._preempt_ids
            )
        start = time.perf_counter()  # overlapped, a call lasts about one GPU step
        outputs = self._guarded(self._advance_in_flight, [])
        plan = self.scheduler.schedule()
        outputs += self._guarded(self._sample_prepared, self._prepared_seqs())
        outputs += self._fail_faults(plan)
        if plan.is_empty:
            idle = not outputs and self._sampled is None
            if idle and self.tiers is not None and self.scheduler.has_unfinished():
                self.tiers.wait(0.01)  # only loads or lookups in flight: nothing to compute yet
            return outputs
        if not self.overlap:
            start = time.perf_counter()
        outputs += self._guarded(lambda: self._run_plan(plan), [c.seq for c in plan.chunks])
        self.swap_cost.observe_step(plan.num_tokens, time.perf_counter() - start)
        if self.tiers is not None and plan.preempted:
            self.swap_cost.observe_load_rate(self.tiers.load_bytes_per_s())
        return outputs

    def _guarded(
        self, work: Callable[[], list[RequestOutput]], involved: list[Sequence]
    ) -> list[RequestOutput]:
        """work(), or, if it raises (not an engine fault), the failure of the requests in
        `involved` and in flight."""
        try:
            return work()
        except Exception as exc:
            if is_engine_fault(exc):
                logger.critical("engine fault (not caused by one request): %r", exc)
                raise
            involved = involved + self._drop_in_flight()
            logger.exception("engine step failed; failing the %d requests in it", len(involved))
            message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
            return self.fail(list(dict.fromkeys(s.request_id for s in involved)), message)

    def _drop_in_flight(self) -> list[Sequence]:
        """Forget the steps in flight; their sequences."""
        seqs: list[Sequence] = self._prepared_seqs()
        if self._sampled is not None:
            seqs += self._sampled.seqs
        if self._launched is not None:
            seqs += [c.seq for c in self._launched.plan.chunks]
        self._sampled = self._launched = self._to_sample = None
        return seqs

    def _fail_faults(self, plan: StepPlan) -> list[RequestOutput]:
        """Fail, each alone, the requests whose own work raised (plan.faults, emptied)."""
        outputs = []
        for fault in plan.faults:
            logger.warning("request %s failed on its own: %s", fault.request_id, fault)
            message = f"this request failed while running: {fault}"
            outputs += self.fail([fault.request_id], message)
        plan.faults.clear()
        return outputs

    def _preempt_ids(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.preempt(self._seqs[request_id])

    def set_expert_slots(self, num_slots: int, preempt: bool = True) -> None:
        """Move the KV/expert boundary now (MoE offloading): the experts get num_slots
        slots, the KV pool the rest. With preempt, sequences holding KV blocks in the
        experts' way are preempted (and recomputed later); without, the blocks move as
        they are freed."""
        if self.moe is None:
            raise InvalidRequestError("set_expert_slots needs a MoE model with expert offloading")
        self.moe.set_expert_slots(num_slots, self._preempt_ids if preempt else None)
        self.moe.num_rebalances += 1
        logger.info(
            "rebalance (requested): KV %d blocks, expert slots %d (target %d)",
            self.moe.kv_blocks, self.moe.cache.capacity, self.moe.target_slots,
        )  # fmt: skip

    def fail(self, request_ids: Seq[str], message: str) -> list[RequestOutput]:
        """Finish these requests with reason "error" and free their blocks."""
        outputs = []
        for request_id in request_ids:
            out = self._finish_now(request_id, "error")
            if out is not None:
                out.error = message
                outputs.append(out)
        return outputs

    def request_ids(self) -> list[str]:
        """Ids of every request queued or running."""
        return list(self._seqs)

    # ---- running a plan, synchronously or overlapped -----------------------------------

    def _run_plan(self, plan: StepPlan) -> list[RequestOutput]:
        if self._sampled is None and not self.overlap:
            plan, sampled = self.runner.execute(plan)  # without the chunks of faulty requests
            rows = sampling_seqs(plan)
            outputs: list[RequestOutput] = []
        else:
            plan, logits = self.runner.launch(plan, self._sampled)
            if self._overlaps(plan):
                self._launched = LaunchedStep(plan, logits, self._record_step_event())
                return self._fail_faults(plan)
            outputs = self._take_sampled()  # tokens in flight come first
            rows, sampled = self._sample_running(plan, logits)
        # A step that samples nothing has no host sync: tier stores must wait for its KV.
        computed = self._record_step_event()
        tokens = [] if sampled is None else sampled.token_ids.tolist()  # the one host sync
        self.scheduler.record_computed(plan, computed)
        got_token = self.scheduler.append_tokens(list(rows), tokens)
        return outputs + self._emit(plan, got_token, sampled)

    def _sample_running(
        self, plan: StepPlan, logits: torch.Tensor | None
    ) -> tuple[tuple[Sequence, ...], SamplerOutput | None]:
        """Sample the rows of a launched plan whose sequences still run (not finished or
        preempted since the launch); those sequences, and their tokens."""
        prepared = self._prepare_running(plan, logits)
        if prepared is None:
            return (), None
        return tuple(prepared.seqs), self.runner.sample_prepared(prepared)

    def _prepare_running(
        self, plan: StepPlan, logits: torch.Tensor | None
    ) -> PreparedSampling | None:
        """The sampling of a launched plan's rows whose sequences still run, up to the
        grammar masks (runner.prepare_sampling); None when no row is sampled."""
        rows = sampling_seqs(plan)
        keep = [i for i, s in enumerate(rows) if s.status is SequenceStatus.RUNNING]
        return self.runner.prepare_sampling(plan, logits, None if len(keep) == len(rows) else keep)

    def _overlaps(self, plan: StepPlan) -> bool:
        """Whether the plan's tokens may reach the host a step late: not when a KV policy
        or prompt logprobs read them right after the step (nor, unless overlap_recall, the
        recall store)."""
        return self.overlap and all(
            c.seq.kv is None and c.seq.params.prompt_logprobs is None
            and (c.seq.recall is None or self.overlap_recall)
            for c in plan.chunks
        )  # fmt: skip

    def _advance_in_flight(self) -> list[RequestOutput]:
        """Take the tokens of the step sampled last time, then sample the step launched
        last time (its tokens come out of the next call)."""
        outputs = self._take_sampled()
        launched = self._launched
        if launched is None:
            return outputs
        prepared = self._prepare_running(launched.plan, launched.logits)
        if prepared is not None:
            self._to_sample = (launched.plan, prepared)
            if not self.sample_after_schedule:
                self._sample_prepared()  # now, before the placeholders are appended
        self.scheduler.record_computed(launched.plan, launched.computed)
        for seq in [] if prepared is None else prepared.seqs:
            seq.token_ids.append(PENDING)  # the scheduler sees the token to come
        self._launched = None
        return outputs

    def _sample_prepared(self) -> list[RequestOutput]:
        """Sample the step launched last time (prepared by _advance_in_flight), once the
        next step is scheduled; its tokens come out of the next call."""
        if self._to_sample is not None:
            (plan, prepared), self._to_sample = self._to_sample, None
            sampled = self.runner.sample_prepared(prepared)
            self._sampled = SampledStep(plan, prepared.seqs, sampled)
        return []

    def _prepared_seqs(self) -> list[Sequence]:
        return [] if self._to_sample is None else list(self._to_sample[1].seqs)

    def _take_sampled(self) -> list[RequestOutput]:
        """The outputs of the step whose tokens are on their way to the host."""
        step = self._sampled
        if step is None:
            return []
        host = step.wait()
        got_token: list[Sequence] = []
        rows: list[int] = []
        for row, (seq, token) in enumerate(zip(step.seqs, host.token_ids.tolist(), strict=True)):
            if seq.finished:
                continue  # aborted or failed meanwhile: its placeholder went with it
            assert seq.token_ids[-1] == PENDING, seq.request_id
            seq.token_ids[-1] = token
            got_token.append(seq)
            rows.append(row)
        self._sampled = None
        return self._emit(step.plan, got_token, host, rows)

    def _emit(
        self,
        plan: StepPlan,
        got_token: list[Sequence],
        sampled: SamplerOutput | None,
        rows: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Stop checks and outputs for the sequences that got a token; `rows`: their rows
        of `sampled` (default 0, 1, ...)."""
        # Constrained sequences that go on get their next masks filled on a worker while
        # this step finishes and the next is scheduled (finishing reads no matcher).
        self.runner.grammar_masks.advance(
            [s for s in got_token if s.grammar is not None and self._goes_on(s)]
        )
        outputs = self._fail_faults(plan)  # policies that raised while observing
        plan.faults.extend(self.kv_policies.after_step(plan))
        outputs += self._fail_faults(plan)
        if sampled is not None and sampled.logprobs is not None:
            record_logprobs(got_token, sampled, rows)
        for seq in got_token:
            if seq.finished:
                continue  # failed above; its output carries the error
            self.num_generated_tokens += 1
            reason = stop_reason(seq, self.loaded.eos_token_ids)
            if reason is not None:
                if seq.detokenizer is not None:
                    seq.detokenizer.flush()
                if seq.params.session_id is not None:
                    ttl = seq.params.cache_ttl_s  # set with session_id (SamplingParams)
                    assert ttl is not None
                    self.sessions.pin(seq.params.session_id, ttl, seq.request_id)
                self.scheduler.finish(seq, reason)
                del self._seqs[seq.request_id]
            elif seq.final_only:
                continue  # an output a step would cost O(tokens) for nobody
            outputs.append(request_output(seq, self.tokenizer, delta_tokens=1))
        return outputs

    def _goes_on(self, seq: Sequence) -> bool:
        """False if a constrained sequence's last token surely ends it (a stop token, the
        sampler's -1, or a prompt-scoring request); it may still end for other reasons."""
        token = seq.token_ids[-1]
        return token >= 0 and token not in self.loaded.eos_token_ids and seq.max_tokens > 0

    def _record_step_event(self) -> torch.cuda.Event | None:
        """An event after this step's kernels, for tier stores to wait on (CUDA with tiers)."""
        if self.tiers is None or self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    # ---- introspection --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        tiers = self.tiers.stats() if self.tiers is not None else {}
        return {
            **self.kv.stats(),
            **tiers,
            **self.sessions.stats(),
            **self.kv_policies.stats(),
            **self.scheduler.tier_loads.stats(),
            **(self.moe.stats() if self.moe is not None else {}),
            **(self.parts.recall.stats() if self.parts.recall is not None else {}),
            **(graphs.stats() if (graphs := self.parts.runner.recall_graphs) else {}),
            **(self.parts.parallel.stats() if self.parts.parallel is not None else {}),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
        }

    def check_integrity(self) -> None:
        """Raise KVIntegrityError unless the KV manager and the scheduler's queues agree."""
        check_engine_integrity(self.parts, self._seqs)

    def close(self) -> None:
        """Finish writing blocks to the tiers and close them, and stop the tensor-parallel
        ranks (the engine is unusable after)."""
        self.requests.grammars.close()
        self.runner.grammar_masks.close()
        if self.tiers is not None:  # first: the workers flush their tiers too
            self.tiers.close(flush=True)
            self.tiers = None
        if self.parts.parallel is not None:
            self.parts.parallel.close()
