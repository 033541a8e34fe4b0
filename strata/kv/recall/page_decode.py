"""A page's selecting decode step: every row of a RecallPage (page.py) at once, per layer.

    inputs  q [rows, H, D], k, v [rows, KVH, D]; active [rows] bool: the rows decoding
    per sparse layer s, over the page's whole buffers:
      write k, v into each active row's tail at its `held`
      scores (the policy's, bound to the page) -> top budget blocks per row and head
      working-set update (inactive rows keep their slots) and fills from the host
      attention over sink + working set + tail, per row
    output  [rows, H, D]; inactive rows' outputs mean nothing

Every shape is the page's, and the rows' counts are device tensors: nothing syncs, and
the step is captured in a CUDA graph per layer (page.graphs) and replayed whatever rows
take part. Blocks leaving a row's tail retire after the step's last layer, per sequence
and for all its paged layers at once, outside the graph (RecallAttention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.chunk_attention import masked_decode_attention
from strata.kv.recall.fetch import fill
from strata.kv.recall.geometry import RecallGeometry
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.page import RecallPage
from strata.kv.recall.policy import RecallPolicy, SummaryRoom
from strata.kv.recall.prefetch import LayerPrefetch
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.tensors import SequenceTensors
from strata.kv.recall.working_set import WorkingSet

if TYPE_CHECKING:
    from strata.kv.recall.attention import RecallRows


class PageDecoder:
    """The decode of one page, bound to its whole buffers (made once its first row has
    allocated them)."""

    # CUDA: attention over sink, working set and tail read in place by one Triton kernel
    # and its merge (off: concatenated and masked; both compared in gpu_recall_check.py)
    attention_kernel = True
    # CUDA: a page's fetched values come on a side stream while the current stream makes
    # or copies the keys (off: one after the other; both compared in gpu_recall_check.py)
    fetch_stream = True

    def __init__(
        self, page: RecallPage, geometry: RecallGeometry, policy: RecallPolicy,
        room: SummaryRoom, rope: Rotary | None, store: HostKVStore, shard: HeadShard | None,
    ) -> None:  # fmt: skip
        g, whole = geometry, page.whole()
        self.geometry, self.store, self.shard, self.room = g, store, shard, room
        self.t = SequenceTensors.of(whole, g, room.max_blocks)
        self.ws = WorkingSet(
            g.sparse_layers, g.num_kv_heads, g.working_set_slots(room.slots), g.block_size,
            g.head_dim, g.dtype, page.device, whole,
        )  # fmt: skip
        policy.allocate(room, rope, whole)
        policy.for_page()
        self.policy = policy
        self.tail_index = torch.arange(g.tail_capacity, device=page.device)
        # the step's inputs, written in place for the decode (and its graphs) to read;
        # inactive rows keep stale values, whose outputs mean nothing
        rows, dev = page.capacity, page.device
        self.q = torch.zeros((rows, g.num_heads, g.head_dim), dtype=g.dtype, device=dev)
        self.k = torch.zeros((rows, g.num_kv_heads, g.head_dim), dtype=g.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.active = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        # cross-layer prefetch (prefetch.py); not across tensor-parallel ranks
        self.prefetch = LayerPrefetch(self, dev) if g.prefetch and shard is None else None

    def decode(
        self, s: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:  # fmt: skip
        g, t, ws = self.geometry, self.t, self.ws
        write = ((self.tail_index == t.held[:, None]) & active[:, None])[:, None, :, None]
        tail_k, tail_v = t.tail_k[s], t.tail_v[s]  # [rows, KVH, tail, D]
        tail_k.copy_(torch.where(write, k.to(g.dtype)[:, :, None, :], tail_k))
        tail_v.copy_(torch.where(write, v.to(g.dtype)[:, :, None, :], tail_v))
        picks = self.pick(s, q)
        if self.prefetch is not None:
            self.prefetch.picked.copy_(picks)
        held, moves = ws.update(s, picks, active)
        side = self.side if self.fetch_stream else None
        fill(ws, self.policy, self.store, t.key_slots, t.value_slots, s, moves, False,
             t.bytes_fetched, side)  # fmt: skip
        t.blocks_attended.add_(held.sum(dim=(-1, -2)))
        return attend(q, t.sink_k[s], t.sink_v[s], ws.k[s], ws.v[s], held, tail_k, tail_v,
                      t.held, scale, self.attention_kernel)  # fmt: skip

    def pick(self, s: int, q: torch.Tensor) -> torch.Tensor:
        """[rows, KVH, slots] the blocks each row's query q [rows, H, D] picks in sparse
        layer s: the policy's top scores over the live middle blocks."""
        g = self.geometry
        grouped = q.view(q.shape[0], g.num_kv_heads, g.group_size, g.head_dim)
        scores = self.policy.scores(s, grouped, self.room.max_blocks, live=self.t.middle)
        if self.shard is not None:  # a replicated head's GQA group spans ranks
            scores = self.shard.max_over_replicas(scores)
        return torch.topk(scores, self.room.slots, dim=-1, sorted=False).indices


def attend(
    q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, ws_k: torch.Tensor,
    ws_v: torch.Tensor, attended: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    held: torch.Tensor, scale: float, kernel: bool,
) -> torch.Tensor:  # fmt: skip
    """A page's decode attention, q [rows, H, D] over each row's sink [rows, KVH, S, D], its
    working-set slots [rows, KVH, slots, bs, D] where attended [rows, KVH, slots], and its
    tail [rows, KVH, T, D] up to held [rows]: on CUDA with `kernel`, read in place by
    triton_page_attention; else concatenated and masked."""
    if q.is_cuda and kernel:
        from strata.ops.triton_page_attention import page_attention

        return page_attention(q, sink_k, sink_v, ws_k, ws_v, attended, tail_k, tail_v, held,
                              scale)  # fmt: skip
    rows, kvh, _, bs, _ = ws_k.shape
    keys = torch.cat([sink_k, ws_k.flatten(-3, -2), tail_k], dim=-2)
    values = torch.cat([sink_v, ws_v.flatten(-3, -2), tail_v], dim=-2)
    tail_index = torch.arange(tail_k.shape[-2], device=q.device)
    tail = (tail_index <= held[:, None])[:, None, :].expand(-1, kvh, -1)
    sink = torch.ones((rows, kvh, sink_k.shape[-2]), dtype=torch.bool, device=q.device)
    mask = torch.cat([sink, attended.repeat_interleave(bs, dim=-1), tail], -1)
    return masked_decode_attention(q, keys, values, mask, scale)


@dataclass(frozen=True)
class PageStep:
    """The parts of a step that decode through one page, with their index tensors."""

    page: RecallPage
    parts: tuple[RecallRows, ...]
    flat: torch.Tensor  # [n] each part's row of the flat batch
    rows: torch.Tensor  # [n] its page row
    active: torch.Tensor  # [capacity] bool


def page_steps(parts: tuple[RecallRows, ...], device: torch.device) -> tuple[PageStep, ...]:
    """The step's selecting decode parts, grouped by page (in order of first part)."""
    groups: dict[int, list[RecallRows]] = {}
    for part in parts:
        if part.state.selecting(part.chunk):
            groups.setdefault(id(part.state.page), []).append(part)
    steps = []
    for members in groups.values():
        page = members[0].state.page
        rows = [p.state.row for p in members]
        active = torch.zeros(page.capacity, dtype=torch.bool)
        active[rows] = True
        flat = torch.tensor([p.first for p in members])
        to = lambda x: x.to(device, non_blocking=True)  # noqa: E731  (as the runner's rows)
        steps.append(PageStep(page, tuple(members), to(flat), to(torch.tensor(rows)), to(active)))
    return tuple(steps)


@dataclass(frozen=True)
class LayerRows:
    """A layer's recall work over the flat batch: each unit reads its rows of q [T, H, D],
    k, v [T, KVH, D] and positions [T], and writes its rows of out [T, H, D]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    out: torch.Tensor
    scale: float


def run_page_step(step: PageStep, s: int, rows: LayerRows, layer_graphs: bool) -> None:
    """Decode sparse layer s for the step's parts through their page into out's rows: from
    the layer's CUDA graph where the page has them and `layer_graphs`, else eagerly (or
    into a whole step's graph being captured: step_graphs.py). What leaves their tails
    retires after the step's last layer (RecallAttention)."""
    page, d = step.page, step.page.decoder
    assert d is not None
    for into, x in ((d.q, rows.q), (d.k, rows.k), (d.v, rows.v)):
        into[step.rows] = x[step.flat].to(into.dtype)
    d.active.copy_(step.active)
    guessed = d.prefetch is not None and d.prefetch.join(s)
    fn: Callable[[], torch.Tensor] = lambda: d.decode(s, d.q, d.k, d.v, d.active, rows.scale)  # noqa: E731
    graphs = page.graphs if layer_graphs else None
    result = graphs.run(s, fn) if graphs is not None else fn()
    if guessed:
        assert d.prefetch is not None
        d.prefetch.count(s, d.t)
    rows.out[step.flat] = result[step.rows].to(rows.out.dtype)
