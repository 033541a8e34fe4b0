"""A step's recall rows as int64s: what a tensor-parallel worker needs to mirror them.

Rank 0's RecallManager admits and plans; every worker keeps its own store over its own
KV heads (mirror.py). Per recall row of a step, FIELDS values:

    serial, policy, budget_blocks, max_tokens, host_blocks, prompt_tokens,  the RecallKV
    start, end, tail_start, new_tail_start, num_middle,                     the RecallChunk
    first_row,                                                              in the batch
    page_rows                                                               its page's rows

`policy` is the name's index in RECALL_POLICIES. The RecallKV numbers ride with every
row, so a worker admits a sequence at its first row with no message of its own; a new
page there gets rank 0's rows, so the ranks' pages (and their decode steps) match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strata.kv.recall.attention import RecallRows
from strata.kv.recall.registry import RECALL_POLICIES
from strata.kv.recall.sequence import RecallChunk

FIELDS = 13


@dataclass(frozen=True)
class WireRow:
    """One recall row as a worker reads it."""

    serial: int
    policy: str
    budget_blocks: int
    max_tokens: int
    host_blocks: int
    prompt_tokens: int
    chunk: RecallChunk
    first_row: int
    page_rows: int


def encode_rows(rows: Sequence[RecallRows]) -> np.ndarray:
    names = RECALL_POLICIES.names()
    values: list[int] = []
    for row in rows:
        s, c = row.state, row.chunk
        values += [s.serial, names.index(s.policy.name), s.budget_blocks, s.max_tokens,
                   len(s.value_slots), s.prompt_tokens, c.start, c.end, c.tail_start,
                   c.new_tail_start, c.num_middle, row.first, s.page.capacity]  # fmt: skip
    return np.asarray(values, np.int64)


def decode_rows(data: np.ndarray) -> list[WireRow]:
    names = RECALL_POLICIES.names()
    out = []
    for values in data.reshape(-1, FIELDS).tolist():
        serial, policy, budget, max_tokens, slots, prompt, *chunk, first, rows = values
        out.append(WireRow(serial, names[policy], budget, max_tokens, slots, prompt,
                           RecallChunk(*chunk), first, rows))  # fmt: skip
    return out
