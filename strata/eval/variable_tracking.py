"""Variable tracking (RULER's vt): follow a chain of assignments through noise.

    VAR ABCDE = 48213   ...noise...   VAR FGHIJ = VAR ABCDE   ...   VAR KLMNO = VAR FGHIJ

One chain of NUM_HOPS hops: the answer is every variable that ends up holding the value.
The statements go in at uniformly drawn depths of the noise haystack, in chain order.
"""

from __future__ import annotations

import random
import string

from strata.eval.corpus import NOISE_SENTENCE
from strata.eval.sample import Sample

NUM_HOPS = 4
MAX_NEW_TOKENS = 30  # RULER's tokens_to_generate for vt


def _names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def build_variable_tracking(seed: int, index: int, size: int) -> Sample:
    rng = random.Random(seed)
    names = _names(rng, NUM_HOPS + 1)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(NUM_HOPS)]
    depths = sorted(rng.random() for _ in chain)
    sentences = [NOISE_SENTENCE] * size
    for offset, (depth, statement) in enumerate(zip(depths, chain, strict=True)):
        sentences.insert(round(depth * (len(sentences) - offset)) + offset, statement)
    return Sample(
        task="vt",
        index=index,
        context=(
            "Memorize and track the chain of variable assignments hidden in the text below.\n\n"
            + " ".join(sentences)
        ),
        question=f"\n\nQuestion: Find all variables that are assigned the value {value} in "
        "the text above.",
        answer_prefix=f"Answer: Following the chain of assignments in the text above, "
        f"{len(names)} variables are assigned the value {value}. They are:",
        references=tuple(names),
        metric="all",
        max_new_tokens=MAX_NEW_TOKENS,
    )
