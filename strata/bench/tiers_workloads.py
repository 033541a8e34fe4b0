"""Workloads of `strata bench tiers`, shaped like LMCache's benchmarks, as token ids.

Long-document QA: documents of a few lengths, each asked several questions.

    question j of document d = document d + suffix j          (suffix shorter than a block)
    |<------------- document: whole blocks, reusable --------->|<- suffix ->|

Multi-round chat: users each holding a growing conversation.

    turn t of user u = turn t-1's prompt + its answer + user message t
    |<- first message ->|<- answer 1 ->|<- message 2 ->|<- answer 2 ->| ... |<- message t ->|

Token ids are random in [LOW_ID, vocab): random weights do not care what they say, and
no id is a special token of the models Strata knows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LOW_ID = 1000


def random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    low = min(LOW_ID, vocab_size // 4)
    return [rng.randrange(low, vocab_size) for _ in range(n)]


@dataclass(frozen=True)
class Document:
    name: str
    token_ids: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]  # one per question

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def question(self, j: int) -> list[int]:
        return [*self.token_ids, *self.suffixes[j]]


def documents(
    lengths: list[int],
    docs_per_length: int,
    questions: int,
    suffix_len: int,
    vocab_size: int,
    seed: int,
) -> list[Document]:
    """`docs_per_length` documents of each length, each with `questions` suffixes."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for d in range(docs_per_length):
            suffixes = tuple(
                tuple(random_ids(rng, suffix_len, vocab_size)) for _ in range(questions)
            )
            ids = tuple(random_ids(rng, length, vocab_size))
            out.append(Document(f"doc{length}-{d}", ids, suffixes))
    return out


@dataclass(frozen=True)
class ChatWorkload:
    """Each user's first message and the messages of its later turns; answers come from
    the model (`answer_len` tokens each, EOS ignored)."""

    messages: tuple[tuple[tuple[int, ...], ...], ...]  # [user][turn] -> message ids
    answer_len: int

    @property
    def num_users(self) -> int:
        return len(self.messages)

    @property
    def num_turns(self) -> int:
        return len(self.messages[0])

    def max_context(self) -> int:
        """Tokens of the longest turn's prompt plus its answer."""
        return max(sum(len(m) for m in user) for user in self.messages) + (
            self.num_turns * self.answer_len
        )


def chat_workload(
    users: int,
    turns: int,
    first_len: int,
    message_len: int,
    answer_len: int,
    vocab_size: int,
    seed: int,
) -> ChatWorkload:
    """The first message of each user is `first_len` tokens (a system prompt and context),
    later ones `message_len` tokens."""
    rng = random.Random(seed)
    messages = tuple(
        tuple(
            tuple(random_ids(rng, first_len if t == 0 else message_len, vocab_size))
            for t in range(turns)
        )
        for _ in range(users)
    )
    return ChatWorkload(messages, answer_len)
