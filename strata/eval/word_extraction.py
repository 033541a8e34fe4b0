"""Aggregation tasks (RULER's cwe and fwe): which words occur most often.

cwe (common words extraction): a numbered list of English words in which NUM_COMMON
words appear COMMON_FREQ times each and every other word UNCOMMON_FREQ times, shuffled.
The answer is the NUM_COMMON common words. The haystack size is the uncommon word count.

fwe (frequent words extraction): a text of coded words (random letter strings) drawn
from a Zipf distribution of exponent FWE_ALPHA. The answer is the three most frequent.
The haystack size is the number of words.
"""

from __future__ import annotations

import random
import string
from collections import Counter

from strata.eval.corpus import word_list
from strata.eval.sample import Sample

NUM_COMMON = 10
COMMON_FREQ = 30  # at 4k tokens and above; shorter lengths scale it down (common_freq)
UNCOMMON_FREQ = 3
CWE_MAX_NEW_TOKENS = 120  # RULER's tokens_to_generate for cwe
FWE_ALPHA = 2.0
FWE_VOCAB = 500
FWE_MAX_NEW_TOKENS = 50  # RULER's tokens_to_generate for fwe


def common_freq(length: int) -> int:
    """How often each common word appears: COMMON_FREQ from 4k tokens, fewer below (the
    common words alone take ~4 tokens x NUM_COMMON x frequency)."""
    return max(UNCOMMON_FREQ + 2, min(COMMON_FREQ, length // 128))


def build_common_words(seed: int, index: int, size: int, freq: int = COMMON_FREQ) -> Sample:
    rng = random.Random(seed)
    vocab = sorted(set(word_list("noun") + word_list("adjective") + word_list("verb")))
    order = rng.sample(vocab, len(vocab))
    if size > len(order) - NUM_COMMON:
        raise ValueError(f"cwe: {size} uncommon words asked, the word lists hold fewer")
    common, uncommon = order[:NUM_COMMON], order[NUM_COMMON : NUM_COMMON + size]
    words = common * freq + uncommon * UNCOMMON_FREQ
    random.Random(rng.getrandbits(64)).shuffle(words)
    listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    return Sample(
        task="cwe",
        index=index,
        context=(
            "Below is a numbered list of words. Some of them appear more often than the "
            f"others. Memorize the ones that appear most often.\n\n{listing}"
        ),
        question=f"\n\nQuestion: What are the {NUM_COMMON} most common words in the list above?",
        answer_prefix=f"Answer: The {NUM_COMMON} words that appear most often in the list are:",
        references=tuple(common),
        metric="all",
        max_new_tokens=CWE_MAX_NEW_TOKENS,
    )


def _coded_vocab(rng: random.Random) -> list[str]:
    vocab: dict[str, None] = {}
    while len(vocab) < FWE_VOCAB:
        vocab["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))] = None
    return list(vocab)


def build_frequent_words(seed: int, index: int, size: int) -> Sample:
    rng = random.Random(seed)
    vocab = _coded_vocab(rng)
    weights = [1.0 / (rank + 1) ** FWE_ALPHA for rank in range(len(vocab))]
    words = random.Random(rng.getrandbits(64)).choices(vocab, weights, k=size)
    counts = Counter(words).most_common()
    top = tuple(w for w, _ in counts[:3])
    return Sample(
        task="fwe",
        index=index,
        context=(
            "Read the coded text below and keep track of how often each coded word appears."
            f"\n\n{' '.join(words)}"
        ),
        question="\n\nQuestion: Without any explanation, what are the three most frequent "
        "coded words in the text above?",
        answer_prefix="Answer: The three most frequent coded words in the text above are:",
        references=top,
        metric="all",
        max_new_tokens=FWE_MAX_NEW_TOKENS,
    )
