"""LLM: the offline Python API over LLMEngine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

from tqdm.auto import tqdm

from strata.config import ENGINE_OPTIONS, EngineConfig
from strata.engine.chat import chat_prompt_ids
from strata.engine.engine import LLMEngine
from strata.engine.outputs import RequestOutput
from strata.engine.sampling_params import SamplingParams
from strata.errors import InvalidRequestError, RequestFailedError
from strata.options import build, describe

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """Generate from a model offline.

    `model` and the keyword options below are those of `EngineConfig` and its sections,
    by the names the command line uses too; moe=MoEConfig(...) gives the MoE options
    whole. An unknown keyword raises TypeError listing the valid ones.
    Call `close()` (or use `with LLM(...) as llm:`) to finish writing tier blocks.

    Options (keyword = default: meaning):
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.engine = LLMEngine(build(EngineConfig, {"model": model, **options}))

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
        self.engine.requests.grammars.prefetch(p.structured_output for p in param_list)
        seqs = [self.engine.prepare(prompt, p) for prompt, p in zip(batch, param_list, strict=True)]
        for seq in seqs:
            seq.final_only = True  # _run reads finished outputs only
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


LLM.__doc__ = f"{(LLM.__doc__ or '').rstrip()}\n{describe(ENGINE_OPTIONS)}\n"


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [cast(list[int], items)]  # one prompt given as token ids
    return cast(list[Prompt], items)


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
