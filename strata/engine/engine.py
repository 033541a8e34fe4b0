"""LLMEngine: one loop of schedule -> run -> sample -> update, shared by every front end."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from strata.attention.backend import choose_backend, get_backend
from strata.config import EngineConfig
from strata.engine.detokenizer import Detokenizer, decode_ids
from strata.engine.outputs import RequestOutput, TokenLogprobs
from strata.engine.plan import StepPlan
from strata.engine.runner import ModelRunner
from strata.engine.sampler import SamplerOutput
from strata.engine.sampling_params import SamplingParams
from strata.engine.scheduler import Scheduler
from strata.engine.sequence import Sequence, SequenceStatus
from strata.engine.shadow_pass import ShadowPass
from strata.errors import ContextLengthError, InvalidRequestError, KVCacheTooSmallError
from strata.kv.cache import KVCache
from strata.kv.codec import get_codec
from strata.kv.coded_attention import attention_over
from strata.kv.manager import KVIntegrityError, KVManager
from strata.kv.policies.base import AttentionShape
from strata.kv.policies.model_access import ModelAccess
from strata.kv.policies.runtime.driver import KVPolicyDriver, PolicyDefaults
from strata.kv.policies.runtime.reconstruction import (
    PASS_HEADROOM,
    ContextReconstruction,
    PassLimits,
)
from strata.kv.prefix import root_key
from strata.kv.sessions import SessionPins
from strata.kv.swap_cost import SwapCostModel
from strata.kv.tiers.build import build_tier_loads, build_tiers
from strata.kv.tiers.manager import TierManager
from strata.models.loader import LoadedModel, load_model
from strata.models.rope import inverse_frequencies
from strata.moe.boundary import ExpertOffload
from strata.moe.rebalancer import Rebalancer

logger = logging.getLogger("strata.engine")

GIB = 1 << 30


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.2f} MiB"


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        requested_len = config.scheduler.max_model_len
        # With expert offloading, routed experts are built in (pinned) CPU memory.
        expert_device = torch.device("cpu") if config.moe.enabled else None
        # RoPE tables also cover the reconstruction passes KVzip runs after a context.
        rope_len = None if requested_len is None else requested_len + PASS_HEADROOM
        self.loaded: LoadedModel = load_model(
            config.model, self.device, self.dtype, rope_len, config.seed, expert_device
        )
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        limit = self.model_config.context_limit
        self.max_model_len = min(requested_len or limit, limit)
        if limit < self.model_config.max_position_embeddings:
            logger.info(
                "context capped at the sliding window, %d tokens (sliding-window attention "
                "is not implemented; within the window it equals full attention)",
                limit,
            )
        num_params = sum(p.numel() for p in self.loaded.model.parameters())
        logger.info(
            "model %s: %s, %d layers, %.1fM parameters, %s on %s",
            self.loaded.name, self.model_config.model_type, self.model_config.num_layers,
            num_params / 1e6, str(self.dtype).removeprefix("torch."), self.device,
        )  # fmt: skip
        backend_name, why = choose_backend(config.attention_backend, self.device)
        self.backend = get_backend(backend_name)
        logger.info("attention backend %s (%s)", backend_name, why)
        block_size = config.cache.block_size
        self.codec = get_codec(config.cache.kv_cache_dtype)
        self.moe: ExpertOffload | None = None
        self.rebalancer: Rebalancer | None = None
        if config.moe.enabled and self.model_config.is_moe:
            if not self.codec.lossless:
                raise ValueError(
                    f"MoE expert offloading shares one arena with a raw KV pool: use "
                    f"kv_cache_dtype='auto', not {config.cache.kv_cache_dtype!r}"
                )
            from strata.moe.build import build_offload

            self.moe = build_offload(self)  # the KV pool and the expert slots share an arena
            num_blocks = self.moe.arena.num_blocks
            self.kv_cache: KVCache = self.moe.arena.kv_cache
        else:
            # One full-precision tail row per running sequence holds its open block
            # (codec_tail.py).
            tail_rows = 0 if self.codec.lossless else config.scheduler.max_num_seqs
            num_blocks = self._decide_num_blocks(tail_rows)
            self.kv_cache = KVCache(
                self.model_config, num_blocks, block_size, self.dtype, self.device, self.codec,
                tail_rows,
            )  # fmt: skip
        # `auto` keeps the layout string (and so the keys of stored blocks) it always had.
        kv_layout = f"{str(self.dtype).removeprefix('torch.')}/bs{block_size}"
        if not self.codec.lossless:
            kv_layout += f"/{self.codec.layout_name}"
        self.tiers: TierManager | None = build_tiers(
            config.cache.tiers, self.kv_cache, self.loaded.fingerprint, self.dtype
        )
        self.kv = KVManager(
            num_blocks,
            block_size,
            root_key(self.loaded.fingerprint, kv_layout),
            config.cache.enable_prefix_caching,
            tiers=self.tiers,
        )
        self.sessions = SessionPins(self.kv, self.tiers, config.cache.tiers.session_gpu_fraction)
        self.swap_cost = SwapCostModel(
            self.kv_cache.block_bytes, block_size, self.device,
        )  # fmt: skip
        tier_loads = build_tier_loads(
            self.tiers, self.kv, config.cache.tiers.preemption_mode,
            self.swap_cost.swap_is_cheaper,
        )  # fmt: skip
        self.scheduler = Scheduler(
            config.scheduler, self.kv, tier_loads, reclaim=self.sessions.reclaim
        )
        if self.moe is not None:
            self.moe.attach(self.kv)
            self.rebalancer = Rebalancer(
                self.moe,
                config.moe.rebalance_interval,
                min_kv_blocks=-(-self.max_model_len // block_size),
                block_size=block_size,
            )
        attention = attention_over(self.kv_cache, self.backend)  # wraps it for a lossy codec
        self.runner = ModelRunner(self.loaded.model, self.kv_cache, attention, self.device)
        cfg = self.model_config
        self.kv_policies = KVPolicyDriver(
            self.kv, self.kv_cache,
            AttentionShape(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
            PolicyDefaults(config.cache.kv_policy, config.cache.kv_budget,
                           config.cache.evict_interval),
            model=self._model_access(),
            reconstruction=ContextReconstruction(
                ShadowPass(self.runner), self.kv,
                PassLimits(config.scheduler.max_num_batched_tokens,
                           max_positions=self.loaded.model.rope.cos.shape[0]),
            ),
        )  # fmt: skip
        logger.info(
            "KV policy: default %s%s; requests may name their own; policies that evict "
            "while decoding evict every %d steps",
            config.cache.kv_policy,
            "" if config.cache.kv_budget is None else f" (budget {config.cache.kv_budget:g})",
            config.cache.evict_interval,
        )
        if self.kv_cache.tails is not None:
            self.kv_cache.tails.live_blocks = self._open_blocks
        self._maybe_capture_graphs()
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    def _model_access(self) -> ModelAccess:
        inv_freq, scaling = inverse_frequencies(self.model_config.hf_config,
                                                self.model_config.head_dim)  # fmt: skip
        return ModelAccess(inv_freq.to(self.device), scaling, self.tokenizer)

    def _maybe_capture_graphs(self) -> None:
        """Capture decode CUDA graphs once the KV pool exists (graph-safe backend on CUDA)."""
        if self.config.enforce_eager or self.device.type != "cuda":
            return
        if not getattr(self.loaded.model, "supports_cuda_graphs", True):
            logger.info("CUDA graphs off: the model reads expert routing on the host")
            return
        if not self.runner.backend.graph_safe:
            logger.info("CUDA graphs off: the %s attention backend is not graph-safe",
                        self.runner.backend.name)  # fmt: skip
            return
        sched = self.config.scheduler
        max_batch = min(self.config.cuda_graph_max_batch, sched.max_num_seqs)
        self.runner.capture_graphs(max_batch, self.max_model_len)

    # ---- KV pool sizing -------------------------------------------------------------------

    def _decide_num_blocks(self, tail_rows: int = 0) -> int:
        """Blocks that fit the KV memory budget, in the codec's bytes per block; a lossy
        codec's tail rows (full-precision blocks) come out of the same budget."""
        cache = self.config.cache
        per_block = KVCache.bytes_per_block(
            self.model_config, cache.block_size, self.dtype, self.codec
        )
        raw_block = KVCache.bytes_per_block(self.model_config, cache.block_size, self.dtype)
        tail_bytes = tail_rows * raw_block
        if cache.num_blocks is not None:
            num_blocks, source = cache.num_blocks, "num_blocks"
        elif cache.kv_cache_memory is not None:
            num_blocks = max(0, int(cache.kv_cache_memory * GIB) - tail_bytes) // per_block
            source = f"kv_cache_memory={cache.kv_cache_memory} GiB"
        elif self.device.type == "cuda":
            budget = self._measure_free_gpu_memory()
            num_blocks = max(0, budget - tail_bytes) // per_block
            source = f"{cache.gpu_memory_utilization:.0%} of GPU memory minus the warm-up peak"
        else:
            num_blocks = max(0, int(cache.DEFAULT_CPU_KV_GIB * GIB) - tail_bytes) // per_block
            source = f"CPU default {cache.DEFAULT_CPU_KV_GIB} GiB"
        if not self.codec.lossless:
            logger.info(
                "KV codec %s: %d bytes a block (%s: %d), %.2fx the blocks per GiB; %d "
                "full-precision tail rows for open blocks, %s; attention reads coded blocks "
                "decoded into a per-layer scratch (%s backend, no fused dequant kernel)",
                self.codec.name, per_block, str(self.dtype).removeprefix("torch."), raw_block,
                raw_block / per_block, tail_rows, format_bytes(tail_bytes), self.backend.name,
            )  # fmt: skip
        capacity = num_blocks * cache.block_size
        needed_blocks = -(-self.max_model_len // cache.block_size)
        if num_blocks < needed_blocks:
            raise KVCacheTooSmallError(
                f"the KV pool ({source}) holds {num_blocks} blocks = {capacity} tokens "
                f"({format_bytes(num_blocks * per_block)}), but one sequence of max_model_len="
                f"{self.max_model_len} needs {needed_blocks} blocks "
                f"({format_bytes(needed_blocks * per_block)}); raise kv_cache_memory or lower "
                "max_model_len"
            )
        logger.info(
            "KV pool: %d blocks x %d tokens = %d tokens, %s (%s, kv_cache_dtype %s); "
            "max_model_len %d, "
            "max_num_batched_tokens %d, max_num_seqs %d, prefix caching %s",
            num_blocks, cache.block_size, capacity, format_bytes(num_blocks * per_block), source,
            self.codec.name, self.max_model_len, self.config.scheduler.max_num_batched_tokens,
            self.config.scheduler.max_num_seqs, "on" if cache.enable_prefix_caching else "off",
        )  # fmt: skip
        return num_blocks

    def _measure_free_gpu_memory(self) -> int:
        """Bytes left for KV after a warm-up step of the largest batch the scheduler allows."""
        from strata.engine.warmup import warmup_peak_bytes

        peak = warmup_peak_bytes(self)
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.cache.gpu_memory_utilization) - peak - others

    def _open_blocks(self) -> set[int]:
        """Blocks that running sequences have partly computed: the tail rows still needed."""
        bs = self.kv.block_size
        return {
            self.kv.block_table(s.request_id)[s.num_kv_slots // bs]
            for s in self.scheduler.running
            if s.num_kv_slots % bs and self.kv.has(s.request_id)
        }

    # ---- requests -------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"model {self.loaded.name} has no tokenizer: pass prompts as token ids"
                )
            return prompt, list(self.tokenizer(prompt).input_ids)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}"
            )
        return None, ids

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the context; returns its resolved max_tokens."""
        n, limit = len(prompt_ids), self.max_model_len
        if n == 0:
            raise InvalidRequestError("the prompt is empty; it must contain at least one token")
        if n >= limit:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {limit} (max_model_len), "
                "including at least one generated token"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length {limit} (max_model_len); lower max_tokens to at most {limit - n}"
            )
        return max_tokens

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
    ) -> str:
        """Queue a request; raises InvalidRequestError (and queues nothing) if it is bad."""
        return self.enqueue(self.prepare(prompt, params, request_id, stream))

    def prepare(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
    ) -> Sequence:
        """Tokenize and check a request without queueing it."""
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt)
        max_tokens = self.validate(ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        detokenizer = None
        if self.tokenizer is not None and (stream or params.stop):
            detokenizer = Detokenizer(self.tokenizer, params.skip_special_tokens, params.stop)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        seq = Sequence(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            seed=seed & 0xFFFFFFFF,
            max_tokens=max_tokens,
            detokenizer=detokenizer,
        )
        self.kv_policies.attach(seq)
        return seq

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
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns outputs of the requests that got a token.

        If running the step raises, the requests in it are finished with reason "error"
        (their blocks freed, the message in `RequestOutput.error`) and returned; the
        engine stays usable for every other request.
        """
        self.sessions.expire()
        if self.rebalancer is not None:
            seqs = (*self.scheduler.running, *self.scheduler.waiting)
            self.rebalancer.step(
                (s.num_tokens for s in seqs), self.scheduler.num_preemptions, self._preempt_ids
            )
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self.tiers is not None and self.scheduler.has_unfinished():
                self.tiers.wait(0.01)  # only loads or lookups in flight: nothing to compute yet
            return []
        try:
            start = time.perf_counter()
            outputs = self._run_plan(plan)
            self.swap_cost.observe_step(plan.num_tokens, time.perf_counter() - start)
            if self.tiers is not None and plan.preempted:
                self.swap_cost.observe_load_rate(self.tiers.load_bytes_per_s())
            return outputs
        except Exception as exc:
            logger.exception("engine step failed; failing the %d requests in it", len(plan.chunks))
            message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
            return self.fail([c.seq.request_id for c in plan.chunks], message)

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
        sampled = self.runner.execute(plan)
        # A step that samples nothing has no host sync: tier stores must wait for its KV.
        computed = self._record_step_event()
        tokens = [] if sampled is None else sampled.token_ids.tolist()  # the one host sync
        got_token = self.scheduler.update(plan, tokens, computed)
        self.kv_policies.after_step(plan)
        if sampled is not None and sampled.logprobs is not None:
            self._record_logprobs(plan, got_token, sampled)
        outputs = []
        for seq in got_token:
            self.num_generated_tokens += 1
            reason = self._stop_reason(seq)
            if reason is not None:
                if seq.detokenizer is not None:
                    seq.detokenizer.flush()
                if seq.params.session_id is not None:
                    self.sessions.pin(seq.params.session_id, seq.params.cache_ttl_s,
                                      seq.request_id)  # fmt: skip
                self.scheduler.finish(seq, reason)
                del self._seqs[seq.request_id]
            outputs.append(self._output(seq, delta_tokens=1))
        return outputs

    def _record_step_event(self) -> torch.cuda.Event | None:
        """An event after this step's kernels, for tier stores to wait on (CUDA with tiers)."""
        if self.tiers is None or self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _stop_reason(self, seq: Sequence) -> str | None:
        token = seq.token_ids[-1]
        params = seq.params
        if seq.detokenizer is not None and seq.detokenizer.add(token):
            return "stop"
        if not params.ignore_eos and token in self.loaded.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens:
            return "length"
        return None

    def _record_logprobs(
        self, plan: StepPlan, seqs: list[Sequence], sampled: SamplerOutput
    ) -> None:
        assert sampled.logprobs is not None and sampled.top_ids is not None
        assert sampled.top_logprobs is not None
        chosen = sampled.logprobs.tolist()
        top_ids = sampled.top_ids.tolist()
        top_lp = sampled.top_logprobs.tolist()
        for row, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                continue
            top = tuple(zip(top_ids[row][:n], top_lp[row][:n], strict=True))
            seq.logprobs.append(TokenLogprobs(seq.token_ids[-1], chosen[row], top))

    def _output(self, seq: Sequence, delta_tokens: int = 0) -> RequestOutput:
        finished = seq.status is SequenceStatus.FINISHED
        output_ids = seq.output_token_ids
        if seq.detokenizer is not None:
            text = seq.detokenizer.text
            delta = seq.detokenizer.take_delta(finished)
        else:
            text = self._decode(output_ids, seq.params) if finished else ""
            delta = ""
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=text,
            token_ids=output_ids,
            finished=finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            delta_text=delta,
            delta_token_ids=output_ids[len(output_ids) - delta_tokens :] if delta_tokens else [],
        )

    def _decode(self, ids: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return decode_ids(self.tokenizer, ids, params.skip_special_tokens)

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
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
        }

    def check_integrity(self) -> None:
        """Raise KVIntegrityError unless the KV manager and the scheduler's queues agree."""
        self.kv.check_integrity()
        if self.moe is not None:
            self.moe.check_integrity()
        if self.kv_cache.tails is not None:
            problems = self.kv_cache.tails.check()
            if problems:
                raise KVIntegrityError("KV tail check failed:\n  " + "\n  ".join(problems))
        for seq in self.scheduler.running:
            table = self.kv.block_table(seq.request_id)
            if len(table) * self.kv.block_size < seq.num_kv_slots:
                raise KVIntegrityError(
                    f"running {seq.request_id!r} has {seq.num_kv_slots} KV slots "
                    f"but {len(table)} blocks"
                )
        for seq in self.scheduler.waiting:
            if self.kv.has(seq.request_id):
                raise KVIntegrityError(f"waiting {seq.request_id!r} holds blocks")
        sched = self.scheduler
        live = {s.request_id for s in (*sched.running, *sched.waiting, *sched.loading.values())}
        if live != set(self._seqs):
            raise KVIntegrityError(f"engine tracks {set(self._seqs)} but scheduler has {live}")
        if self.tiers is not None and not sched.tier_loads.in_flight:
            self.tiers.flush()
            problems = self.tiers.check_integrity()
            if problems:
                raise KVIntegrityError("KV tier check failed:\n  " + "\n  ".join(problems))

    def close(self) -> None:
        """Finish writing blocks to the tiers and close them (the engine is unusable after)."""
        if self.tiers is not None:
            self.tiers.close(flush=True)
            self.tiers = None
