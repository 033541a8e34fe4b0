"""LLM: the offline Python API over LLMEngine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from strata.config import CacheConfig, EngineConfig, MoEConfig, SchedulerConfig, TierConfig
from strata.engine.chat import chat_prompt_ids
from strata.engine.engine import LLMEngine
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.errors import InvalidRequestError, RequestFailedError

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """Generate from a model offline.

    model: a Hugging Face folder, a .gguf file, "random:PRESET" or None for the
    embedded SmolLM2-135M-Instruct. kv_cache_memory is in GiB. The kv_* tier arguments
    and preemption_mode are those of `TierConfig` (kv_cpu_memory and kv_disk_size in GiB).
    kv_cache_dtype picks the KV block codec: "auto", "fp8", "int8", "int4" or "int2".
    kv_policy / kv_budget: the KV eviction policy of requests whose SamplingParams name
    none (see `SamplingParams.kv_policy`); "full" keeps every token. kv_evict_interval:
    decode steps between evictions of the policies that evict while decoding
    (`CacheConfig.kv_evict_interval`; None: the block size).
    moe: expert offloading of a Mixture-of-Experts model (MoEConfig; e.g.
    MoEConfig(gpu_memory=20)).
    Call `close()` (or use `with LLM(...) as llm:`) to finish writing tier blocks.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str = "auto",
        kv_cache_memory: float | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.90,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        kv_cpu_memory: float | None = None,
        kv_disk_dir: str | None = None,
        kv_disk_size: float = 16.0,
        kv_remote: str | None = None,
        kv_remote_timeout_s: float = 0.5,
        kv_tier_eviction: str = "lru",
        preemption_mode: str = "auto",
        session_gpu_fraction: float = 0.25,
        moe: MoEConfig | None = None,
        kv_policy: str = "full",
        kv_budget: float | None = None,
        kv_evict_interval: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            seed=seed,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            moe=moe or MoEConfig(),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                num_blocks=num_kv_blocks,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                kv_policy=kv_policy,
                kv_budget=kv_budget,
                kv_evict_interval=kv_evict_interval,
                kv_cache_dtype=kv_cache_dtype,
                tiers=TierConfig(
                    cpu_memory=kv_cpu_memory,
                    disk_dir=kv_disk_dir,
                    disk_size=kv_disk_size,
                    remote=kv_remote,
                    remote_timeout_s=kv_remote_timeout_s,
                    eviction=kv_tier_eviction,
                    preemption_mode=preemption_mode,
                    session_gpu_fraction=session_gpu_fraction,
                ),
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
            ),
        )
        self.engine = LLMEngine(config)

    def close(self) -> None:
        """Finish writing KV blocks to the tiers and release them."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def check_integrity(self) -> None:
        self.engine.check_integrity()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); outputs in prompt order.

        Every prompt is checked before any is queued: one bad prompt fails the call and
        leaves the engine as it was.
        """
        batch = _as_prompt_list(prompts)
        param_list = _broadcast(params, len(batch))
        seqs = [self.engine.prepare(prompt, p) for prompt, p in zip(batch, param_list, strict=True)]
        return self._run([self.engine.enqueue(seq) for seq in seqs], use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of messages) or to several; one output each."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.chat_prompt_ids(list(c)) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm)

    def chat_prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        return chat_prompt_ids(self.engine.tokenizer, messages, self.engine.loaded.name)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield one request's output after every step that gives it a token."""
        request_id = self.engine.add_request(prompt, params, stream=True)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        if out.error is not None:
                            raise RequestFailedError(out.error)
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as bar:
            try:
                while pending:
                    for out in self.engine.step():
                        if out.error is not None and out.request_id in pending:
                            raise RequestFailedError(out.error)
                        if out.finished and out.request_id in pending:
                            pending.discard(out.request_id)
                            done[out.request_id] = out
                            bar.update(1)
            finally:
                for request_id in pending:
                    self.engine.abort(request_id)
        return [done[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items


def _broadcast(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
