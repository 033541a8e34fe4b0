"""The requests a serving benchmark sends: random token-id prompts, or text prompts.

Both kinds come from `random_workload` with the same seed, so the lengths are the same:
a text prompt writes each token id of its token-id twin as a common English word. One
such word is about one token with a leading space in BPE vocabularies; the server's usage
gives the exact count. Token-id prompts work on /v1/completions only (Strata and vLLM
take `prompt` as a list of ids); chat messages need text.
"""

from __future__ import annotations

from typing import Literal

from strata.bench.client import BenchRequest
from strata.bench.workload import random_workload

PromptKind = Literal["token-ids", "text"]

DEFAULT_VOCAB_SIZE = 32000  # below every supported model's vocabulary

_WORD_TEXT = (
    "the of and to in is that it was for on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has more her "
    "two like him see time could no make than first been its who now people my made over did "
    "down only way find use may water long little very after words called just where most "
    "know get through back much go good new write our me man too any day same right look "
    "think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number"
)
WORDS = tuple(_WORD_TEXT.split())


def bench_requests(
    num_requests: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    kind: PromptKind,
    seed: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> list[BenchRequest]:
    """`num_requests` requests with lengths uniform in the (inclusive) ranges."""
    workload = random_workload(num_requests, input_range, output_range, vocab_size, seed)
    requests = []
    for index, (ids, out_len) in enumerate(
        zip(workload.prompts, workload.output_lens, strict=True)
    ):
        prompt: str | list[int] = ids
        if kind == "text":
            prompt = " ".join(WORDS[t % len(WORDS)] for t in ids)
        requests.append(BenchRequest(index, prompt, len(ids), out_len))
    return requests
