"""Teacher forcing through the engine: given continuation tokens replace sampled ones.

Perplexity under a KV policy needs the log-probability of each token of a known text
given the (compressed) cache of everything before it, computed by the real engine with
the policy active. The engine has no prompt log-probabilities, so the text goes in as a
short prompt and the rest is *decoded*, one token a step, with a sampler that emits the
text's next token instead of sampling and reports its log-probability:

    text     | prompt (prefilled, compressed at its end) | t0 t1 t2 ... (decoded) |
    step k   logits at the last computed token  ->  emit t_k, logprob log p(t_k | ...)

Decoding is the path a policy acts on in serving (StreamingLLM and TreeKV measure
perplexity this way: each token is predicted from the cache the policy left). Rows are
matched to texts by the request seed, which the sampler already receives per row:
request seed i forces `targets[i]`, output index t forces `targets[i][t]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from strata.engine.engine import LLMEngine
from strata.engine.sampler import Sampler, SamplerOutput, SamplingBatch


class TeacherForcingSampler(Sampler):
    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets  # [texts, tokens] int64 on the engine's device

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        forced = self.targets[batch.seed, batch.step]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, forced[:, None]).squeeze(1)
        top_lp, top_ids = logprobs.topk(max(batch.max_logprobs, 1), dim=-1)
        return SamplerOutput(forced, chosen, top_ids, top_lp)


@contextmanager
def teacher_forcing(engine: LLMEngine, targets: list[list[int]]) -> Iterator[None]:
    """While active, a request with seed i decodes `targets[i]` (all the same length).

    Only such requests may run meanwhile: each needs seed in [0, len(targets)),
    max_tokens <= the target length, ignore_eos and logprobs=0.
    """
    if not targets or len({len(t) for t in targets}) != 1:
        raise ValueError("teacher forcing needs one or more target lists of equal length")
    runner = engine.runner  # decode graphs capture the model only: sampling stays eager
    saved = runner.sampler
    runner.sampler = TeacherForcingSampler(
        torch.tensor(targets, dtype=torch.int64, device=engine.device)
    )
    try:
        yield
    finally:
        runner.sampler = saved
