"""Per-step metadata of the Triton backend: device tensors only, built once in `prepare`.

The flat batch splits into two disjoint sets of sequences, each with its own tensors:

    decode rows   query_len == 1  -> DecodeMetadata  (split-K decode kernel)
    prefill rows  query_len > 1   -> PrefillMetadata (varlen causal prefill kernel)

A short chunk over a long cached prefix (a question after a cached document, a turn
after a cached history) is split into one decode row per token instead, row t attending
over prefix + t + 1 keys. The prefill kernel would give it one program per KV head,
each walking the whole prefix alone; the decode kernel splits the prefix across the GPU
and pays for it with one read of the prefix per token, which wins below SHORT_CHUNK
tokens.

All integer tensors are int32 and come from one pinned host buffer copied without
blocking. Block tables are padded with block 0 to a common width; kernels never read a
table entry at or past ceil(seq_len / block_size). The host-side ints (`max_seq_len`,
`num_tokens`) only size launch grids and never come from the device.

CUDA graphs (decode-only batches of n rows, n a captured size; TritonAttention's hooks):

    static = graph_metadata(slot_mapping [N], block_size, max_model_len)
             TritonMetadata(slot_mapping, block_size,
                            decode=DecodeMetadata.allocate(N, ceil(max_model_len / block_size),
                                                           max_model_len, dev), prefill=None)
    capture: graph_rows(static, n): the first n rows (views), used by the model forward
    replay:  the caller rewrites slot_mapping[:n] (padding rows -1: no write);
             fill_graph_metadata(rows, seq_lens [n], block_tables [m, width])
             -> DecodeMetadata.set_rows_: lengths of all n rows (0 = padding), tables of
             the m live rows

Static across replays: every tensor's address and shape, `block_size`, and
`max_seq_len` (the bound), because the decode grid (n, kv_heads, splits) is a function of
n, kv_heads, the bound and the device's SM count only. Padding rows have seq_len 0: their
output is zeros and their slot -1 writes nothing. The split kernels' fp32 scratch is
allocated inside `attend`, so it comes from the graph's private pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strata.attention.backend import AttentionMetadata, BatchLayout

SHORT_CHUNK = 16  # at most this many query tokens ...
LONG_PREFIX = 1024  # ... over at least this many cached ones run as decode rows


@dataclass
class DecodeMetadata:
    """Decode rows. Leading dim n = number of rows; fixed per captured graph."""

    query_rows: torch.Tensor  # [n] int32: row of each decode token in the flat batch
    seq_lens: torch.Tensor  # [n] int32: tokens attended over; 0 marks a padding row
    block_tables: torch.Tensor  # [n, width] int32, padded with block 0
    max_seq_len: int  # host-side bound on seq_lens (sizes the split-K grid)

    @property
    def num_rows(self) -> int:
        return self.query_rows.shape[0]

    @classmethod
    def allocate(
        cls, num_rows: int, width: int, max_seq_len: int, device: torch.device
    ) -> DecodeMetadata:
        """Static buffers for graph capture: rows i of the flat batch, all padding."""
        return cls(
            query_rows=torch.arange(num_rows, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(num_rows, dtype=torch.int32, device=device),
            block_tables=torch.zeros(num_rows, width, dtype=torch.int32, device=device),
            max_seq_len=max_seq_len,
        )

    def rows(self, n: int) -> DecodeMetadata:
        """Views of the first n rows (the same bound)."""
        return DecodeMetadata(
            self.query_rows[:n], self.seq_lens[:n], self.block_tables[:n], self.max_seq_len
        )

    def fill_(self, live: DecodeMetadata) -> None:
        """Copy `live` (a decode-only step: query_rows == arange) into these static buffers.

        Rows past live.num_rows become padding. No host sync: shapes are host ints.
        """
        if live.max_seq_len > self.max_seq_len:
            raise ValueError("live max_seq_len exceeds the static bound")
        self.set_rows_(live.seq_lens, live.block_tables)

    def set_rows_(self, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
        """Rows < len(seq_lens) take these lengths, rows past it become padding (0); rows
        < len(block_tables) take its columns as their first ones. No host sync."""
        n = seq_lens.shape[0]
        rows, width = block_tables.shape
        if n > self.num_rows or rows > n or width > self.block_tables.shape[1]:
            raise ValueError("live decode batch exceeds the static buffers")
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        if n < self.num_rows:
            self.seq_lens[n:].zero_()
        self.block_tables[:rows, :width].copy_(block_tables, non_blocking=True)


@dataclass
class PrefillMetadata:
    """Prefill rows (p sequences with query_len > 1)."""

    query_rows: torch.Tensor  # [p] int32: flat-batch row of each sequence's first token
    cu_query_lens: torch.Tensor  # [p + 1] int32: prefix sums of query_lens over these rows
    seq_lens: torch.Tensor  # [p] int32: context length (cached prefix + the chunk)
    block_tables: torch.Tensor  # [p, width] int32, padded with block 0
    num_tokens: int  # host-side sum of query_lens (sizes the grid)


@dataclass
class TritonMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor  # [tokens] int64 cache slot of each token; < 0 = skip
    block_size: int
    decode: DecodeMetadata | None
    prefill: PrefillMetadata | None


def build_metadata(
    layout: BatchLayout, slot_mapping: torch.Tensor, device: torch.device
) -> TritonMetadata:
    """Host lists -> device tensors, with a single host-to-device copy."""
    bs = layout.block_size
    decode: list[int] = []  # batch index of each decode row (repeated for split chunks)
    decode_row: list[int] = []  # its flat-batch row
    decode_len: list[int] = []  # keys it attends over
    prefill: list[int] = []
    starts = np.concatenate([[0], np.cumsum(layout.query_lens, dtype=np.int64)])
    for i, (q_len, ctx_len) in enumerate(zip(layout.query_lens, layout.context_lens, strict=True)):
        if q_len == 1 or (q_len <= SHORT_CHUNK and ctx_len - q_len >= LONG_PREFIX):
            for t in range(q_len):
                decode.append(i)
                decode_row.append(int(starts[i]) + t)
                decode_len.append(ctx_len - q_len + t + 1)
        else:
            prefill.append(i)

    parts: list[np.ndarray] = []  # int32 pieces of the one upload, in order

    def table(rows: list[int]) -> np.ndarray:
        blocks = [layout.block_tables[i][: -(-layout.context_lens[i] // bs)] for i in rows]
        width = max(1, max(len(b) for b in blocks))
        out = np.zeros((len(rows), width), dtype=np.int32)
        for r, b in enumerate(blocks):
            out[r, : len(b)] = b
        return out

    ctx = np.asarray(layout.context_lens, dtype=np.int32)
    q_lens = np.asarray(layout.query_lens, dtype=np.int32)
    if decode:
        parts += [np.asarray(decode_row, np.int32), np.asarray(decode_len, np.int32), table(decode)]
    if prefill:
        cu = np.concatenate([[0], np.cumsum(q_lens[prefill])]).astype(np.int32)
        parts += [starts[prefill].astype(np.int32), cu, ctx[prefill], table(prefill)]

    flat = np.concatenate([p.ravel() for p in parts]) if parts else np.zeros(0, np.int32)
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        host = host.pin_memory()
    buf = host.to(device, non_blocking=True)
    views: list[torch.Tensor] = []
    offset = 0
    for p in parts:
        views.append(buf[offset : offset + p.size].view(p.shape))
        offset += p.size

    dmeta = pmeta = None
    if decode:
        rows, lens, tables = views[:3]
        dmeta = DecodeMetadata(rows, lens, tables, max(decode_len))
        views = views[3:]
    if prefill:
        rows, cu_t, lens, tables = views
        pmeta = PrefillMetadata(rows, cu_t, lens, tables, int(q_lens[prefill].sum()))
    return TritonMetadata(slot_mapping, bs, dmeta, pmeta)
