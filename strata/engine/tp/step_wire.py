"""StepInputs: what a worker rank needs of one step, and its compact int64 encoding.

Workers hold no scheduler and no sequences: rank 0 sends each step's flat batch (token
ids, positions, KV slots, logits rows) and attention layout (query and context lengths,
block tables), the queries a KV policy observes (ObservedRows, runtime/gathered.py), under
a lossy KV codec the open blocks of running sequences (whose tail rows stay;
codec_tail.py), when a KV policy gives layers different KV (PyramidKV), each distinct
layer layout and which layer uses which (runtime/step_kv.py), and the recall rows: the
chunks of recall sequences, which hold no pool slots (kv/recall/wire.py). Block tables are
rank 0's, so they are identical on every rank: each rank's pool has the same blocks,
holding its own KV heads. Encoding, all int64:

    [tokens, seqs, rows, block_size, observed, live, parts, layers, pooled, recall,
     ids[tokens], positions[tokens], slots[pooled], rows[rows], query_lens[seqs],
     observed rows[observed], live blocks[live], layer_of[layers], recall rows[recall],
     layout, then each of the `parts` layer layouts as slots[pooled] + layout]

where `pooled` counts the tokens of pool rows (all but the recall rows), a layout is
context_lens[seqs], table_lens[seqs], tables (concatenated), and its query lengths are
the step's (its sequences are those of pool rows). In a layer layout a table that is
the step's own (PyramidKV's shorter layers share it) has length SAME and no entries: a
step carries each table once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from strata.attention.backend import BatchLayout
from strata.kv.policies.runtime.step_kv import LayerLayout

HEADER = 10
SAME = -1  # a layer layout's table length: the step's own table for that sequence


def _empty() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass(frozen=True)
class StepInputs:
    ids: np.ndarray  # [tokens] int64
    positions: np.ndarray  # [tokens] int64
    slots: np.ndarray  # [tokens] int64
    logits_rows: np.ndarray  # [rows] int64
    layout: BatchLayout
    observed: np.ndarray = field(default_factory=_empty)  # ObservedRows.encode
    live_blocks: np.ndarray = field(default_factory=_empty)
    layer_layouts: tuple[LayerLayout, ...] = ()  # empty when every layer uses `layout`
    layer_of: np.ndarray = field(default_factory=_empty)  # [layers]: index in layer_layouts
    recall: np.ndarray = field(default_factory=_empty)  # kv/recall/wire.py encode_rows

    def encode(self) -> np.ndarray:
        layout = self.layout
        header = [len(self.ids), len(layout.block_tables), len(self.logits_rows),
                  layout.block_size, len(self.observed), len(self.live_blocks),
                  len(self.layer_layouts), len(self.layer_of), len(self.slots),
                  len(self.recall)]  # fmt: skip
        parts = [
            np.asarray(header, np.int64), self.ids, self.positions, self.slots, self.logits_rows,
            np.asarray(layout.query_lens, np.int64), self.observed, self.live_blocks,
            np.asarray(self.layer_of, np.int64), self.recall, *_layout(layout),
        ]  # fmt: skip
        for part in self.layer_layouts:
            parts += [part.slot_mapping, *_layout(part.layout, layout.block_tables)]
        return np.concatenate(parts).astype(np.int64, copy=False)

    @classmethod
    def decode(cls, data: np.ndarray) -> StepInputs:
        tokens, seqs, rows, block_size, observed, live, parts, layers, pooled, recall = (
            int(v) for v in data[:HEADER]
        )
        read = _Reader(data, HEADER)
        ids, positions, slots, logits_rows = (read(n) for n in (tokens, tokens, pooled, rows))
        query_lens = read(seqs).tolist()
        watched, open_blocks, layer_of = read(observed), read(live), read(layers)
        recall_rows = read(recall)
        layout = read.layout(query_lens, block_size)
        layer_layouts = tuple(
            LayerLayout(read(pooled), read.layout(query_lens, block_size, layout.block_tables))
            for _ in range(parts)
        )
        return cls(ids, positions, slots, logits_rows, layout, watched, open_blocks,
                   layer_layouts, layer_of, recall_rows)  # fmt: skip


def _layout(layout: BatchLayout, base: list[list[int]] | None = None) -> list[np.ndarray]:
    """A layer layout's table that is the step's own (the same list: PyramidKV's shorter
    layers) goes as length SAME and no entries."""
    tables = layout.block_tables
    same = [base is not None and t is base[i] for i, t in enumerate(tables)]
    lens = [SAME if s else len(t) for s, t in zip(same, tables, strict=True)]
    sent = [t for s, t in zip(same, tables, strict=True) if not s]
    flat = np.fromiter(itertools.chain.from_iterable(sent), np.int64, sum(len(t) for t in sent))
    return [np.asarray(layout.context_lens, np.int64), np.asarray(lens, np.int64), flat]


class _Reader:
    """Consecutive slices of an encoded step."""

    def __init__(self, data: np.ndarray, start: int) -> None:
        self.data, self.at = data, start

    def __call__(self, n: int) -> np.ndarray:
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def layout(
        self, query_lens: list[int], block_size: int, base: list[list[int]] | None = None
    ) -> BatchLayout:
        seqs = len(query_lens)
        context_lens, table_lens = self(seqs).tolist(), self(seqs).tolist()
        flat = self(sum(n for n in table_lens if n != SAME)).tolist()
        tables, at = [], 0
        for i, n in enumerate(table_lens):
            if n == SAME:
                assert base is not None, "only a layer layout refers to the step's tables"
                tables.append(base[i])
                continue
            tables.append(flat[at : at + n])
            at += n
        return BatchLayout(query_lens, context_lens, tables, block_size)
