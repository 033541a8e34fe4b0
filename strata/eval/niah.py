"""Needle-in-a-haystack tasks (RULER's niah family), our wording.

A needle "One of the special magic numbers for KEY is: VALUE." is hidden in a haystack:
the noise sentence repeated, or a stretch of Shakespeare (the "essay" haystack). Keys are
adjective-noun pairs from wonderwords, values 7-digit numbers. Needle depths are drawn
uniformly and the needles go in at sentence ends, in order of depth.

| task            | haystack | keys | values per key | keys asked |
|-----------------|----------|------|----------------|------------|
| niah_single_1   | noise    | 1    | 1              | 1          |
| niah_single_2   | essay    | 1    | 1              | 1          |
| niah_multikey_1 | essay    | 4    | 1              | 1          |
| niah_multivalue | essay    | 1    | 4              | 1          |
| niah_multiquery | essay    | 4    | 1              | 4          |
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from strata.eval.corpus import NOISE_SENTENCE, essay_words, word_list
from strata.eval.sample import Sample

MAX_NEW_TOKENS = 128  # RULER's tokens_to_generate for niah


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # "noise" | "essay"
    num_keys: int
    num_values: int
    num_queries: int


NIAH_SPECS = {
    "niah_single_1": NiahSpec("noise", 1, 1, 1),
    "niah_single_2": NiahSpec("essay", 1, 1, 1),
    "niah_multikey_1": NiahSpec("essay", 4, 1, 1),
    "niah_multivalue": NiahSpec("essay", 1, 4, 1),
    "niah_multiquery": NiahSpec("essay", 4, 1, 4),
}


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"
        if key not in taken:
            taken.add(key)
            return key


def _haystack_sentences(kind: str, size: int, rng: random.Random) -> list[str]:
    """`size` units of haystack as sentences: noise repetitions, or ~10 essay words each."""
    if kind == "noise":
        return [NOISE_SENTENCE] * size
    words = essay_words()
    num_words = size * 10
    start = rng.randrange(0, len(words) - num_words) if len(words) > num_words else 0
    sentences: list[str] = []
    current: list[str] = []
    for word in words[start : start + num_words]:
        current.append(word)
        if word[-1] in ".!?":
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences


def build_niah(task: str, seed: int, index: int, size: int) -> Sample:
    """The sample `index` of a niah task with a haystack of `size` units."""
    spec = NIAH_SPECS[task]
    rng = random.Random(seed)  # every random choice but the haystack's length is fixed
    taken: set[str] = set()
    keys = [_key(rng, taken) for _ in range(spec.num_keys)]
    values = {k: [rng.randrange(1_000_000, 10_000_000) for _ in range(spec.num_values)]
              for k in keys}  # fmt: skip
    needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys
               for v in values[k]]  # fmt: skip
    rng.shuffle(needles)
    depths = sorted(rng.random() for _ in needles)
    queries = rng.sample(keys, spec.num_queries)
    hay_rng = random.Random(rng.getrandbits(64))
    sentences = _haystack_sentences(spec.haystack, size, hay_rng)
    for offset, (depth, needle) in enumerate(zip(depths, needles, strict=True)):
        sentences.insert(round(depth * (len(sentences) - offset)) + offset, needle)
    joiner = " " if spec.haystack == "noise" else "\n"
    query = ", ".join(queries)
    noun = "numbers" if spec.num_values > 1 or spec.num_queries > 1 else "number"
    return Sample(
        task=task,
        index=index,
        context=(
            "Some special magic numbers are hidden in the text below. Memorize them: I will "
            f"ask you about them afterwards.\n\n{joiner.join(sentences)}"
        ),
        question=f"\n\nWhat {'are all the' if noun == 'numbers' else 'is the'} special magic "
        f"{noun} for {query} mentioned in the text above?",
        answer_prefix=f"The special magic {noun} for {query} mentioned in the text above "
        f"{'are' if noun == 'numbers' else 'is'}",
        references=tuple(str(v) for q in queries for v in values[q]),
        metric="all",
        max_new_tokens=MAX_NEW_TOKENS,
    )
