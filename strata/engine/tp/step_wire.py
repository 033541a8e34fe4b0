"""StepInputs: what a worker rank needs of one step, and its compact int64 encoding.

Workers hold no scheduler and no sequences: rank 0 sends each step's flat batch (token
ids, positions, KV slots, logits rows) and attention layout (query and context lengths,
block tables), the queries a KV policy observes (ObservedRows, FIELDS int64s each;
runtime/gathered.py), and under a lossy KV codec the open blocks of running sequences
(whose tail rows stay; codec_tail.py). Block tables are rank 0's, so they are identical
on every rank: each rank's pool has the same blocks, holding its own KV heads. Encoding,
all int64:

    [tokens, seqs, rows, block_size, observed, live,
     ids[tokens], positions[tokens], slots[tokens], rows[rows],
     query_lens[seqs], context_lens[seqs], table_lens[seqs],
     observed rows[observed * FIELDS], live blocks[live], tables (concatenated)]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from strata.attention.backend import BatchLayout
from strata.kv.policies.runtime.gathered import FIELDS

HEADER = 6


@dataclass(frozen=True)
class StepInputs:
    ids: np.ndarray  # [tokens] int64
    positions: np.ndarray  # [tokens] int64
    slots: np.ndarray  # [tokens] int64
    logits_rows: np.ndarray  # [rows] int64
    layout: BatchLayout
    observed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    live_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def encode(self) -> np.ndarray:
        layout = self.layout
        tables = layout.block_tables
        observed = len(self.observed) // FIELDS
        header = [len(self.ids), len(tables), len(self.logits_rows), layout.block_size, observed,
                  len(self.live_blocks)]  # fmt: skip
        lens = [len(t) for t in tables]
        flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, sum(lens))
        return np.concatenate(
            [
                np.asarray(header, np.int64),
                self.ids, self.positions, self.slots, self.logits_rows,
                np.asarray(layout.query_lens, np.int64),
                np.asarray(layout.context_lens, np.int64),
                np.asarray(lens, np.int64),
                self.observed,
                self.live_blocks,
                flat,
            ]
        ).astype(np.int64, copy=False)

    @classmethod
    def decode(cls, data: np.ndarray) -> StepInputs:
        tokens, seqs, rows, block_size, observed, live = (int(v) for v in data[:HEADER])
        sizes = [tokens, tokens, tokens, rows, seqs, seqs, seqs, observed * FIELDS, live]
        ends = np.cumsum([HEADER, *sizes])
        ids, positions, slots, logits_rows, query, context, table_lens, watched, open_blocks = (
            data[ends[i] : ends[i + 1]] for i in range(len(sizes))
        )
        flat = data[ends[-1] :].tolist()
        bounds = np.concatenate([[0], np.cumsum(table_lens)]).tolist()
        tables = [flat[bounds[i] : bounds[i + 1]] for i in range(seqs)]
        layout = BatchLayout(query.tolist(), context.tolist(), tables, block_size)
        return cls(ids, positions, slots, logits_rows, layout, watched, open_blocks)
