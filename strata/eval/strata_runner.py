"""Run RULER samples through the Strata engine under one Setting; predictions and KV use.

Every sample of the run is queued at once (continuous batching does the rest); the
engine is stepped here so that each sequence's KV footprint can be read after every
step. Prefix caching must be off in the LLM: a prefix-cache hit would skip the prefill
a policy observes.

    peak KV   the most blocks a sequence held after any step, and at least the blocks of
              its uncompressed context: those all exist at the compression point, which
              compacts them within the step that computes the context's last token
    final KV  the blocks it held after its last step (the compressed context + output)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from strata.engine.engine import LLMEngine
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.eval.prompt import PromptIds, prompt_ids, template_parts
from strata.eval.sample import Sample
from strata.eval.scoring import score
from strata.eval.settings import Setting
from strata.kv.policies.registry import FULL
from strata.kv.recall.registry import is_recall_policy


@dataclass(frozen=True)
class SampleResult:
    task: str
    index: int
    prompt_tokens: int
    prediction: str
    score: float
    peak_kv_bytes: int
    final_kv_bytes: int


@dataclass(frozen=True)
class RunResult:
    setting: Setting
    samples: tuple[SampleResult, ...]
    wall_s: float


def sampling_params(setting: Setting, ids: PromptIds, max_tokens: int) -> SamplingParams:
    """Greedy decoding under the setting's policy. Query-agnostic compresses the context
    before the question is computed (`kv_compress_prefix`), question-cut the context and
    question before the template tail; query-aware compresses the whole prompt once it is
    computed."""
    if setting.is_full:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, kv_policy=FULL)
    prefix = None if setting.protocol == "query-aware" else ids.compressible(setting.protocol)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        kv_policy=setting.policy,
        kv_budget=setting.budget,
        kv_compress_prefix=prefix,
    )


def run_samples(
    llm: LLM, samples: list[Sample], setting: Setting, progress: bool = True
) -> RunResult:
    engine = llm.engine
    tokenizer = engine.tokenizer
    parts = template_parts(tokenizer)
    block_bytes = engine.kv_cache.block_bytes
    start = time.perf_counter()
    by_id: dict[str, tuple[Sample, PromptIds]] = {}
    for sample in samples:
        ids = prompt_ids(tokenizer, sample, parts)
        seq = engine.prepare(ids.all, sampling_params(setting, ids, sample.max_new_tokens))
        by_id[engine.enqueue(seq)] = (sample, ids)
    bs = engine.kv.block_size
    recall = engine.parts.recall
    # A recall sequence holds no pool block: its GPU KV is its recall state's bytes.
    holds_pool = recall is None or not is_recall_policy(setting.policy)
    peak = {
        rid: -(-ids.compressible(setting.protocol) // bs) * block_bytes if holds_pool else 0
        for rid, (_, ids) in by_id.items()
    }
    last = dict.fromkeys(by_id, 0)
    texts: dict[str, str] = {}
    with tqdm(total=len(by_id), desc=setting.label, disable=not progress, leave=False) as bar:
        while len(texts) < len(by_id):
            outputs = engine.step()
            for request_id in by_id:
                if request_id in texts:
                    continue
                held = _gpu_kv_bytes(engine, request_id, block_bytes)
                if held is not None:
                    peak[request_id] = max(peak[request_id], held)
                    last[request_id] = held
            for out in outputs:
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                if out.finished and out.request_id in by_id:
                    texts[out.request_id] = out.text
                    bar.update(1)
    wall = time.perf_counter() - start
    results = tuple(
        SampleResult(
            task=sample.task,
            index=sample.index,
            prompt_tokens=len(ids),
            prediction=texts[rid],
            score=score(sample, texts[rid]),
            peak_kv_bytes=peak[rid],
            final_kv_bytes=last[rid],
        )
        for rid, (sample, ids) in by_id.items()
    )
    return RunResult(setting, results, wall)


def _gpu_kv_bytes(engine: LLMEngine, request_id: str, block_bytes: int) -> int | None:
    """GPU KV bytes a request holds now (pool blocks, or its recall state); None if it
    holds neither yet."""
    recall = engine.parts.recall
    if recall is not None and (held := recall.gpu_bytes_of(request_id)):
        return held
    if engine.kv.has(request_id):
        return len(engine.kv.block_table(request_id)) * block_bytes
    return None
