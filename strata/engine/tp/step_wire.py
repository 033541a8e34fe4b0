"""StepInputs: what a worker rank needs of one step, and its compact int64 encoding.

Workers hold no scheduler and no sequences: rank 0 sends each step's flat batch (token
ids, positions, KV slots, logits rows) and attention layout (query and context lengths,
block tables), the queries a KV policy observes (ObservedRows, runtime/gathered.py), under
a lossy KV codec the open blocks of running sequences (whose tail rows stay;
codec_tail.py), and, when a KV policy gives layers different KV (PyramidKV), each
distinct layer layout and which layer uses which (runtime/step_kv.py). Block tables are
rank 0's, so they are identical on every rank: each rank's pool has the same blocks,
holding its own KV heads. Encoding, all int64:

    [tokens, seqs, rows, block_size, observed, live, parts, layers,
     ids[tokens], positions[tokens], slots[tokens], rows[rows], query_lens[seqs],
     observed rows[observed], live blocks[live], layer_of[layers],
     layout, then each of the `parts` layer layouts as slots[tokens] + layout]

where a layout is context_lens[seqs], table_lens[seqs], tables (concatenated); its query
lengths are the step's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from strata.attention.backend import BatchLayout
from strata.kv.policies.runtime.step_kv import LayerLayout

HEADER = 8


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

    def encode(self) -> np.ndarray:
        layout = self.layout
        header = [len(self.ids), len(layout.block_tables), len(self.logits_rows),
                  layout.block_size, len(self.observed), len(self.live_blocks),
                  len(self.layer_layouts), len(self.layer_of)]  # fmt: skip
        parts = [
            np.asarray(header, np.int64), self.ids, self.positions, self.slots, self.logits_rows,
            np.asarray(layout.query_lens, np.int64), self.observed, self.live_blocks,
            np.asarray(self.layer_of, np.int64), *_layout(layout),
        ]  # fmt: skip
        for part in self.layer_layouts:
            parts += [part.slot_mapping, *_layout(part.layout)]
        return np.concatenate(parts).astype(np.int64, copy=False)

    @classmethod
    def decode(cls, data: np.ndarray) -> StepInputs:
        tokens, seqs, rows, block_size, observed, live, parts, layers = (
            int(v) for v in data[:HEADER]
        )
        read = _Reader(data, HEADER)
        ids, positions, slots, logits_rows = (read(n) for n in (tokens, tokens, tokens, rows))
        query_lens = read(seqs).tolist()
        watched, open_blocks, layer_of = read(observed), read(live), read(layers)
        layout = read.layout(query_lens, block_size)
        layer_layouts = tuple(
            LayerLayout(read(tokens), read.layout(query_lens, block_size)) for _ in range(parts)
        )
        return cls(ids, positions, slots, logits_rows, layout, watched, open_blocks,
                   layer_layouts, layer_of)  # fmt: skip


def _layout(layout: BatchLayout) -> list[np.ndarray]:
    lens = [len(t) for t in layout.block_tables]
    flat = np.fromiter(itertools.chain.from_iterable(layout.block_tables), np.int64, sum(lens))
    return [np.asarray(layout.context_lens, np.int64), np.asarray(lens, np.int64), flat]


class _Reader:
    """Consecutive slices of an encoded step."""

    def __init__(self, data: np.ndarray, start: int) -> None:
        self.data, self.at = data, start

    def __call__(self, n: int) -> np.ndarray:
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def layout(self, query_lens: list[int], block_size: int) -> BatchLayout:
        seqs = len(query_lens)
        context_lens, table_lens = self(seqs).tolist(), self(seqs)
        flat = self(int(table_lens.sum())).tolist()
        bounds = np.concatenate([[0], np.cumsum(table_lens)]).tolist()
        tables = [flat[bounds[i] : bounds[i + 1]] for i in range(seqs)]
        return BatchLayout(query_lens, context_lens, tables, block_size)
