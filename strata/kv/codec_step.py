"""One step of a lossy KV codec: where each token's K/V goes and what attention reads.

Built once per step on the host (`plan_codec_step`), used by every layer
(`write_and_gather`). For a chunk computing positions [s, e) of a sequence:

    blocks     | ... | s//bs (open: earlier tokens in its tail row) | ... | (e-1)//bs |
    this step          written ----------------------------------------------->
    after      complete blocks (e >= their end) are encoded into the pool, rows freed;
               a block still partial keeps (or takes) a tail row

Per layer, the touched blocks are assembled in a work buffer in full precision (tail row
contents, then the step's tokens), complete ones are encoded, open ones go back to their
rows. Attention then runs, with any backend, over a scratch pool holding the step's
complete context blocks decoded (each once) followed by its open blocks exact; the block
tables are remapped into that scratch (`attention_layout`). So a token is read back as it
is stored: decoded once its block is complete, exact while its block is open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from strata.attention.backend import BatchLayout
from strata.kv.codec_tail import TailStore

if TYPE_CHECKING:
    from strata.kv.cache import KVCache


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


@dataclass(frozen=True)
class CodedStepMeta:
    """What the model gets per step under a lossy codec: the codec plan and the attention
    backend's metadata for `CodecStep.attention_layout`."""

    codec: CodecStep
    attention: Any


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

    stored: dict[int, int] = {}  # block id -> scratch index
    tables: list[list[int]] = []
    open_index = iter(range(len(open_work)))
    for end, table in zip(layout.context_lens, layout.block_tables, strict=True):
        num_complete = end // bs
        row = [stored.setdefault(b, len(stored)) for b in table[:num_complete]]
        tables.append(row)
    for row, end in zip(tables, layout.context_lens, strict=True):
        if end % bs:  # its last block is open: the chunk's last work block, in order
            row.append(-1 - next(open_index))
    n_stored = len(stored)
    tables = [[i if i >= 0 else n_stored - 1 - i for i in row] for row in tables]

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
        stored_blocks=t(list(stored)),
        attention_layout=BatchLayout(layout.query_lens, layout.context_lens, tables, bs),
    )


def write_and_gather(
    kv: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, step: CodecStep
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the step's k, v ([tokens, kv_heads, head_dim]) of one layer; return the
    scratch K and V ([blocks, block_size, kv_heads, head_dim]) attention reads."""
    tails = kv.tails
    assert tails is not None
    bs, heads, dim = tails.k.shape[2:]
    dtype = tails.k.dtype
    out = []
    for x, rows in ((k, tails.k[layer]), (v, tails.v[layer])):
        w = torch.zeros((step.num_work, bs, heads, dim), dtype=dtype, device=x.device)
        if step.prior_work.numel():
            w[step.prior_work] = rows[step.prior_rows]
        w.view(-1, heads, dim).index_copy_(0, step.token_work, x.to(dtype))
        out.append(w)
    work_k, work_v = out
    if step.done_work.numel():
        parts = kv.codec.encode(work_k[step.done_work], work_v[step.done_work])
        for pool, part in zip(kv.parts, parts, strict=True):
            pool[layer].index_copy_(0, step.done_blocks, part)
    if step.open_work.numel():
        tails.k[layer].index_copy_(0, step.open_rows, work_k[step.open_work])
        tails.v[layer].index_copy_(0, step.open_rows, work_v[step.open_work])
    coded = [pool[layer].index_select(0, step.stored_blocks) for pool in kv.parts]
    stored_k, stored_v = kv.codec.decode(coded, dtype)
    return (
        torch.cat([stored_k, work_k[step.open_work]]),
        torch.cat([stored_v, work_v[step.open_work]]),
    )
