"""LLMEngine: one loop of schedule -> run -> sample -> update, shared by every front end.

The engine owns the requests it was given and the step loop; its parts are built by
engine/build.py, requests are checked by engine/requests.py, and sampled tokens become
outputs in engine/finishing.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from strata.config import EngineConfig
from strata.engine.build import build_engine_parts
from strata.engine.finishing import record_logprobs, request_output, stop_reason
from strata.engine.integrity import check_engine_integrity
from strata.engine.outputs import RequestOutput
from strata.engine.plan import StepPlan
from strata.engine.requests import RequestFactory
from strata.engine.sampling_params import SamplingParams
from strata.engine.sequence import Sequence
from strata.errors import InvalidRequestError, is_engine_fault

logger = logging.getLogger("strata.engine")


class LLMEngine:
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
        self.scheduler.finish(seq, reason)
        return request_output(seq, self.tokenizer)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns outputs of the requests that got a token.

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
        plan = self.scheduler.schedule()
        failed = self._fail_faults(plan)
        if plan.is_empty:
            if self.tiers is not None and self.scheduler.has_unfinished():
                self.tiers.wait(0.01)  # only loads or lookups in flight: nothing to compute yet
            return failed
        try:
            start = time.perf_counter()
            outputs = self._run_plan(plan)
            self.swap_cost.observe_step(plan.num_tokens, time.perf_counter() - start)
            if self.tiers is not None and plan.preempted:
                self.swap_cost.observe_load_rate(self.tiers.load_bytes_per_s())
            return failed + outputs
        except Exception as exc:
            if is_engine_fault(exc):
                logger.critical("engine fault (not caused by one request): %r", exc)
                raise
            logger.exception("engine step failed; failing the %d requests in it", len(plan.chunks))
            message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
            return failed + self.fail([c.seq.request_id for c in plan.chunks], message)

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

    def _run_plan(self, plan: StepPlan) -> list[RequestOutput]:
        plan, sampled = self.runner.execute(plan)  # without the chunks of faulty requests
        # A step that samples nothing has no host sync: tier stores must wait for its KV.
        computed = self._record_step_event()
        tokens = [] if sampled is None else sampled.token_ids.tolist()  # the one host sync
        got_token = self.scheduler.update(plan, tokens, computed)
        # Constrained sequences that go on get their next masks filled on a worker while
        # this step finishes and the next is scheduled (finishing reads no matcher).
        self.runner.grammar_masks.advance(
            [s for s in got_token if s.grammar is not None and self._goes_on(s)]
        )
        outputs = self._fail_faults(plan)  # policies that raised while observing
        plan.faults.extend(self.kv_policies.after_step(plan))
        outputs += self._fail_faults(plan)
        if sampled is not None and sampled.logprobs is not None:
            record_logprobs(got_token, sampled)
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
