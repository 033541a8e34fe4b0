"""One step of a lossy KV codec: where each token's K/V goes and what attention reads.

Built once per step on the host (`plan_codec_step`), used by every layer
(CodedAttention, coded_attention.py). For a chunk computing positions [s, e) of a sequence:

    blocks     | ... | s//bs (open: earlier tokens in its tail row) | ... | (e-1)//bs |
    this step          written ----------------------------------------------->
    after      complete blocks (e >= their end) are encoded into the pool, rows freed;
               a block still partial keeps (or takes) a tail row

Per layer, the touched blocks ("work" blocks) are assembled in full precision (tail row
contents, then the step's tokens); complete ones are encoded, open ones go back to their
rows. Attention then reads a scratch pool: the step's complete context blocks decoded
(`stored_blocks`, each once) followed by its open blocks exact; `attention_layout` holds
the block tables remapped into that scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.attention.backend import BatchLayout
from strata.kv.codec_tail import TailStore


@dataclass(frozen=True)
class CodecStep:
    """Index tensors of one step (long, on the cache's device)."""

    num_work: int  # blocks the step writes to
    token_work: torch.Tensor  # [tokens] flat index of each token into the work buffer
    prior_work: torch.Tensor  # work blocks with earlier tokens ...
    prior_rows: torch.Tensor  # ... in these tail rows
    done_work: torch.Tensor  # work blocks complete after the step ...
    done_blocks: torch.Tensor  # ... encoded into these pool blocks
    open_work: torch.Tensor  # work blocks still partial ...
    open_rows: torch.Tensor  # ... kept in these tail rows
    stored_blocks: torch.Tensor  # complete context blocks attention reads, scratch [0, n)
    attention_layout: BatchLayout  # block tables into the scratch: stored, then open


def plan_codec_step(layout: BatchLayout, tails: TailStore, device: torch.device) -> CodecStep:
    """Index the step's writes and reads; moves tail rows (freed before any is assigned,
    so one row per running sequence suffices)."""
    bs = layout.block_size
    token_work: list[int] = []
    work: list[tuple[int, bool, bool]] = []  # (block id, has earlier tokens, ends complete)
    for q_len, end, table in zip(
        layout.query_lens, layout.context_lens, layout.block_tables, strict=True
    ):
        start = end - q_len
        for j in range(start // bs, (end - 1) // bs + 1):
            w = len(work)
            lo, hi = max(start, j * bs), min(end, (j + 1) * bs)
            token_work.extend(range(w * bs + lo - j * bs, w * bs + hi - j * bs))
            work.append((table[j], lo > j * bs, hi == (j + 1) * bs))

    prior_work, prior_rows = [], []
    for w, (block, prior, _) in enumerate(work):
        if prior:
            prior_work.append(w)
            prior_rows.append(tails.row_of[block])
    for block, prior, done in work:
        if done or not prior:  # complete now, or a fresh block whose old row is stale
            tails.release(block)
    tails.reserve(sum(1 for _, prior, done in work if not (done or prior)))
    done_work, done_blocks, open_work, open_rows = [], [], [], []
    for w, (block, prior, done) in enumerate(work):
        if done:
            done_work.append(w)
            done_blocks.append(block)
        else:
            open_work.append(w)
            open_rows.append(tails.row_of[block] if prior else tails.assign(block))

    stored, tables = _scratch_tables(layout, len(open_work))

    def t(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    return CodecStep(
        num_work=len(work),
        token_work=t(token_work),
        prior_work=t(prior_work),
        prior_rows=t(prior_rows),
        done_work=t(done_work),
        done_blocks=t(done_blocks),
        open_work=t(open_work),
        open_rows=t(open_rows),
        stored_blocks=t(stored),
        attention_layout=BatchLayout(layout.query_lens, layout.context_lens, tables, bs),
    )


def _scratch_tables(layout: BatchLayout, num_open: int) -> tuple[list[int], list[list[int]]]:
    """(stored: the pool blocks attention reads decoded, each once, in scratch order;
    the block tables remapped into the scratch: stored blocks at [0, len(stored)), then
    the `num_open` open blocks, one per sequence whose last block is partial, in order)."""
    bs = layout.block_size
    stored: dict[int, int] = {}  # block id -> scratch index
    tables = [
        [stored.setdefault(b, len(stored)) for b in table[: end // bs]]
        for end, table in zip(layout.context_lens, layout.block_tables, strict=True)
    ]
    open_index = iter(range(len(stored), len(stored) + num_open))
    for row, end in zip(tables, layout.context_lens, strict=True):
        if end % bs:  # its last block is open: the chunk's last work block, in order
            row.append(next(open_index))
    return list(stored), tables
