"""The host copy of a recall sequence's full prompt blocks, in every layer: what a
published block holds (host_store.py, published.py), and how a sequence reusing such
blocks rebuilds its GPU state from them.

    prompt blocks   | b0 (sink) | b1 ... middle ...      | window full blocks | open |
    sparse layers   | written   | written as they retire | written at the     |  -   |
                    | at the end| (sequence.py)          | prompt's end       |      |
    dense layers    | every full prompt block, written at the prompt's end   |  -   |

`write_prompt_blocks` runs per layer in the prompt's last chunk, after the layer's
blocks retired, for the blocks from `seq.on_host` on (those before it are already in the
store: reused, or written earlier). `load_prefix` gives a sequence admitted over
`blocks` published blocks the state it would have after computing them itself: dense
layers' K/V, the sink, the tail (the last window blocks), the policy's summaries of the
middle blocks (their keys read from the store), and its counts. The prefill that follows
attends every middle block from the store, as always, so its tokens are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from strata.kv.recall.fetch import host_rows
from strata.kv.recall.geometry import SINK_BLOCKS
from strata.kv.recall.rows import copy_rows

if TYPE_CHECKING:
    from strata.kv.recall.sequence import RecallChunk, RecallSequence


def _host_rows(seq: RecallSequence, layer: int, first: int, last: int, keys: bool) -> torch.Tensor:
    """Flat store rows (HostKVStore.flat) of blocks first..last-1 of model layer `layer`,
    [kv_heads * (last - first)], head-major."""
    g = seq.geometry
    table = seq.block_slots_t[0 if keys else 1]  # keys: as admitted
    blocks = torch.arange(first, last, device=table.device).expand(g.num_kv_heads, -1)
    return host_rows(seq.store, table, g.host_layer(layer), blocks).flatten()


def _write(seq: RecallSequence, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """K and V [kv_heads, n * block_size, dim] of blocks first..first+n-1 of `layer` into
    the sequence's store slots."""
    g = seq.geometry
    kvh, bs, d = g.num_kv_heads, g.block_size, g.head_dim
    n = k.shape[1] // bs
    if n == 0:
        return
    host = seq.store.flat()
    src = torch.arange(n * kvh, device=k.device)
    for part, keys in ((k, True), (v, False)):
        rows = part.reshape(kvh * n, bs * d).to(host.dtype)
        copy_rows(rows, host, src, _host_rows(seq, layer, first, first + n, keys))


def read_blocks(
    seq: RecallSequence, layer: int, first: int, last: int, keys: bool
) -> torch.Tensor:  # fmt: skip
    """K (or V) of blocks first..last-1 of model layer `layer` from the store,
    [kv_heads, n * bs, dim] on the compute device; counts the bytes."""
    g = seq.geometry
    host = seq.store.flat()
    src = _host_rows(seq, layer, first, last, keys)
    dst = torch.arange(src.numel(), device=src.device)
    scratch = host.new_empty((src.numel(), host.shape[1]), device=src.device)
    copy_rows(host, scratch, src, dst)
    seq.bytes_fetched += src.numel() * host.shape[1] * host.element_size()
    return scratch.view(g.num_kv_heads, (last - first) * g.block_size, g.head_dim)


def write_prompt_blocks(seq: RecallSequence, layer: int, chunk: RecallChunk) -> None:
    """In the prompt's last chunk, after `layer` attended and retired: the layer's full
    prompt blocks from seq.on_host on that the store lacks go to the sequence's slots."""
    g = seq.geometry
    bs = g.block_size
    first, last = seq.on_host, seq.prompt_tokens // bs
    if first >= last:
        return
    if layer < g.dense_layers:
        span = slice(first * bs, last * bs)
        _write(seq, layer, first, seq.dense.k[layer][:, span], seq.dense.v[layer][:, span])
        return
    s = layer - g.dense_layers
    tail_block = chunk.new_tail_start // bs
    if first < SINK_BLOCKS <= tail_block:  # the sink left the tail: from the sink
        _write(seq, layer, first, seq.sink_k[s][:, first * bs :], seq.sink_v[s][:, first * bs :])
    lo = max(first, tail_block)  # the middle blocks before it were written as they retired
    if lo < last:
        span = slice(lo * bs - chunk.new_tail_start, last * bs - chunk.new_tail_start)
        _write(seq, layer, lo, seq.tail_k[s][:, span], seq.tail_v[s][:, span])


def load_prefix(seq: RecallSequence, blocks: int) -> None:
    """Make a fresh sequence hold its first `blocks` blocks, every layer of which its
    store slots hold (published blocks it reuses), as if it had computed them."""
    g = seq.geometry
    bs = g.block_size
    if seq.computed != 0 or blocks * bs >= seq.prompt_tokens:
        raise RuntimeError(f"a recall sequence at {seq.computed} cannot load {blocks} blocks")
    tail_block = max(0, blocks - g.window_blocks)
    for layer in range(g.dense_layers):
        seq.dense.k[layer][:, : blocks * bs] = read_blocks(seq, layer, 0, blocks, keys=True)
        seq.dense.v[layer][:, : blocks * bs] = read_blocks(seq, layer, 0, blocks, keys=False)
    for s in range(g.sparse_layers):
        layer = g.dense_layers + s
        if tail_block >= SINK_BLOCKS:
            seq.sink_k[s] = read_blocks(seq, layer, 0, SINK_BLOCKS, keys=True)
            seq.sink_v[s] = read_blocks(seq, layer, 0, SINK_BLOCKS, keys=False)
        held = (blocks - tail_block) * bs
        seq.tail_k[s][:, :held] = read_blocks(seq, layer, tail_block, blocks, keys=True)
        seq.tail_v[s][:, :held] = read_blocks(seq, layer, tail_block, blocks, keys=False)
        middle = tail_block - SINK_BLOCKS
        if middle > 0 and seq.policy.selects:
            keys = read_blocks(seq, layer, SINK_BLOCKS, tail_block, keys=True)
            seq.policy.summarize(s, 0, keys.view(g.num_kv_heads, middle, bs, g.head_dim))
    seq.tail_start, seq.computed, seq.on_host = tail_block * bs, blocks * bs, blocks
