"""Carrying out a selection: host rows of picked blocks, working-set fills, attention
masks; over one sequence's tensors or a page's rows (a leading rows dimension).

A host-store row is one block of one head in one sparse layer: row (layer, slot, head),
block_size x head_dim (host_store.py). Nothing here syncs with the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.policy import RecallPolicy
from strata.kv.recall.rows import copy_rows
from strata.kv.recall.working_set import Moves, WorkingSet


def host_rows(
    store: HostKVStore, table: torch.Tensor, s: int, blocks: torch.Tensor
) -> torch.Tensor:
    """Flat host-store rows (HostKVStore.flat) of blocks [..., kv_heads, n] in store
    layer s (sparse layer s: geometry.host_layer), where `table` [..., room] names each
    block's key (or value) slot: the middle blocks' tables, or a sequence's table of
    every block (prefix_copy.py)."""
    kvh = blocks.shape[-2]
    slots = table.gather(-1, blocks.flatten(-2)).view_as(blocks)
    heads = torch.arange(kvh, device=blocks.device)[:, None]
    return (s * store.num_slots + slots) * kvh + heads


def fill(
    ws: WorkingSet, policy: RecallPolicy, store: HostKVStore, key_slots: torch.Tensor,
    value_slots: torch.Tensor, s: int, moves: Moves, exact: bool, bytes_fetched: torch.Tensor,
    side: torch.cuda.Stream | None = None,
) -> None:  # fmt: skip
    """Carry out a working-set update of sparse layer s: values from the host store;
    keys from the host, or made by the policy on the GPU. exact: every block is attended
    exactly (keys from the host). Counts the bytes moved. `side` (CUDA): the values come
    on this stream, forked from and joined back to the current one, while the keys are
    made or copied on the current stream (shadowkv's rebuild then overlaps the fetch)."""
    host = store.flat()
    moved = moves.mask.sum(dim=(-1, -2))
    row_bytes = host.shape[1] * host.element_size()
    with forked(side):
        copy_moves(store, value_slots, s, moves, ws.rows(s, ws.v), ws.slots)
    rebuilt = not exact and policy.write_rebuilt_keys(s, moves, ws.k[s])
    if not rebuilt:
        copy_moves(store, key_slots, s, moves, ws.rows(s, ws.k), ws.slots)
    bytes_fetched += (1 if rebuilt else 2) * moved * row_bytes
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


@contextmanager
def forked(side: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block on `side` after what the current stream has queued (nothing when
    None). The caller joins it back (current.wait_stream(side)) before reading its
    results; tensors made on the current stream stay valid on `side` until then, since
    the allocator reuses their memory only for work queued after the join."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


# CUDA: copy_moves in one kernel (off: index kernels, then the copy; both compared in
# benchmarks/gpu_recall_check.py)
fetch_kernel = True


def copy_moves(
    store: HostKVStore, table: torch.Tensor, s: int, moves: Moves, dst: torch.Tensor,
    ws_slots: int,
) -> None:  # fmt: skip
    """The moved blocks' rows (keys or values: `table` names their slots) of store layer
    s into their working-set rows `dst` (WorkingSet.rows); on CUDA, with fetch_kernel
    on, one kernel works out the rows as it copies."""
    host = store.flat()
    if moves.mask.is_cuda and fetch_kernel:
        from strata.ops.triton_row_copy import fetch_blocks

        lead = (lambda x: x[None]) if moves.blocks.dim() == 2 else (lambda x: x)
        fetch_blocks(host, dst, lead(table), s * store.num_slots, lead(moves.blocks),
                     lead(moves.slots), lead(moves.mask), ws_slots)  # fmt: skip
        return
    src = torch.where(moves.mask, host_rows(store, table, s, moves.blocks), -1).flatten()
    copy_rows(host, dst, src, moves.destination_rows(ws_slots))


def picked_mask(
    held: torch.Tensor, block_size: int, sink_tokens: int, blocks_attended: torch.Tensor
) -> torch.Tensor:
    """[..., kv_heads, sink + working-set tokens] bool: the sink, then the tokens of the
    slots holding a pick (`held` [..., kv_heads, slots]), which count as attended."""
    blocks_attended += held.sum(dim=(-1, -2))
    sink = torch.ones((*held.shape[:-1], sink_tokens), dtype=torch.bool, device=held.device)
    return torch.cat([sink, held.repeat_interleave(block_size, dim=-1)], dim=-1)
