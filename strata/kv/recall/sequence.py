"""RecallSequence: one sequence's KV under a recall policy (regions: geometry.py).

Per step the host plans the chunk (`plan`: which blocks leave the tail, from the token
counts alone); per layer the forward then writes the chunk's K/V and attends
(`attend`), on the device only. Its GPU tensors are one row of a RecallPage (page.py):
a selecting decode step runs for the page's rows together (page_decode.py), and the
sequence only retires what leaves its tails afterwards, every such layer at once, after
the step's last layer (`retire_after_decode`, called by attention.py).

Host slots, per block b (sink, middle and tail alike): keys in key_slots[b], values in
value_slots[b]; middle block j is block j + SINK_BLOCKS. With shared prefixes
(`publishes`), the store holds every layer of its first `on_host` blocks (reused ones,
published by another sequence, or its own prompt once published): the sequence never
writes those slots again, and its prompt's last chunk writes what the store lacks of its
full prompt blocks (prefix_copy.py) for the manager to publish after the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.chunk_attention import chunk_attention
from strata.kv.recall.dense_layers import DenseLayers
from strata.kv.recall.fetch import fill, host_rows, picked_mask
from strata.kv.recall.geometry import SINK_BLOCKS, RecallGeometry
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.page import RecallPage
from strata.kv.recall.policy import RecallPolicy, SummaryRoom
from strata.kv.recall.prefix_copy import read_blocks, write_prompt_blocks
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.rows import copy_rows
from strata.kv.recall.sampled_attention import SampledCounters, sampled_decode
from strata.kv.recall.tensors import SequenceTensors
from strata.kv.recall.working_set import WorkingSet


@dataclass(frozen=True)
class RecallChunk:
    """Tokens [start, end) of a step; the tail held [tail_start, start) before it and holds
    [new_tail_start, end) after it. Middle blocks: `num_middle` before the step."""

    start: int
    end: int
    tail_start: int
    new_tail_start: int
    num_middle: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class RecallSequence:
    static_decode = True  # selecting decode steps run through the page (False: tests compare)
    dense_kernel = True  # CUDA: dense layers decode by the split-K kernel (False: A/B runs)

    def __init__(
        self,
        geometry: RecallGeometry,
        policy: RecallPolicy,
        budget_blocks: int,
        max_tokens: int,
        store: HostKVStore,
        key_slots: list[int],
        value_slots: list[int],
        page: RecallPage,
        row: int,
        owner: str,
        rope: Rotary | None = None,
        prompt_tokens: int = 0,
        serial: int = 0,
        shard: HeadShard | None = None,
        publishes: bool = False,
    ) -> None:
        g = geometry
        self.shard = shard  # tensor parallelism: its heads are this rank's (ranks.py)
        self.serial = serial  # its admission's number (manager.py): the workers' name for it
        self.geometry, self.policy, self.store = g, policy, store
        self.budget_blocks = budget_blocks
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens  # its last chunk readies the policy's selection
        self.page, self.row = page, row
        buffers = page.take(row, owner)
        kvh, d, dt, device = g.num_kv_heads, g.head_dim, g.dtype, page.device
        self.dense = DenseLayers(g, max_tokens, device, self.dense_kernel)
        room_blocks = g.room_blocks(len(value_slots))
        self.publishes = publishes  # its full prompt blocks go to the store in every layer
        t = SequenceTensors.of(buffers, g, room_blocks)
        self.sink_k, self.sink_v, self.tail_k, self.tail_v = t.sink_k, t.sink_v, t.tail_k, t.tail_v
        # A selecting decode step's counts: the tail holds `held` tokens before it, and
        # `middle` middle blocks exist.
        self.held, self.middle = t.held, t.middle
        self.bytes_fetched, self.blocks_attended = t.bytes_fetched, t.blocks_attended
        # cross-layer prefetch (prefetch.py): bytes it moved; per sparse layer, the picks
        # it had guessed and the picks
        self.bytes_prefetched, self.prefetch_counts = t.bytes_prefetched, t.prefetch
        self.owner = owner
        self._hold_slots(t, key_slots, value_slots)
        self.room = SummaryRoom(  # what its summaries and working set cover
            g.sparse_layers, kvh, room_blocks, d, g.block_size, dt, budget_blocks, device,
            g.landmark_tokens, shard, g.quest_page_tokens,
        )  # fmt: skip
        policy.allocate(self.room, rope, buffers)
        self.working_set: WorkingSet | None = None
        if policy.selects:
            self.working_set = WorkingSet(
                g.sparse_layers, kvh, g.working_set_slots(budget_blocks), g.block_size, d, dt,
                device, buffers,
            )  # fmt: skip
        self.tail_start = 0  # the tail holds tokens [tail_start, computed)
        self.computed = 0
        self.decode_steps = 0
        self.sampled = SampledCounters()  # a sampling policy's decode steps (magicpig)
        self.on_host = 0  # leading blocks the store holds in every layer (never rewritten)

    def _hold_slots(self, t: SequenceTensors, key_slots: list[int], value_slots: list[int]) -> None:
        """Block b's keys live in host slot key_slots[b], its values in value_slots[b]; the
        key slots go back to the store once the policy stops reading keys from it. The
        device tables name the middle blocks' slots (middle block j: table entry j), and
        block_slots_t every block's [key slot, value slot], so that the prompt's last
        chunk writes the blocks the store lacks with no host sync (prefix_copy.py)."""
        self.key_slots, self.value_slots = key_slots, value_slots
        self.slots_on_host = torch.tensor([key_slots, value_slots]).view(2, -1)
        self.key_slots_t, self.value_slots_t = t.key_slots, t.value_slots
        for table, slots in ((t.key_slots, key_slots), (t.value_slots, value_slots)):
            middle = slots[SINK_BLOCKS:]
            table[: len(middle)] = torch.tensor(middle, dtype=torch.long)
        device = t.key_slots.device
        self.block_slots_t = torch.tensor([key_slots, value_slots], device=device).view(2, -1)

    # ---- host side, once per step -----------------------------------------------------------

    def plan(self, start: int, end: int) -> RecallChunk:
        """The regions of the step computing tokens [start, end); commits the new tail."""
        bs, w = self.geometry.block_size, self.geometry.window_blocks
        if start != self.computed or end > self.max_tokens:
            raise RuntimeError(
                f"recall chunk [{start}, {end}) does not follow the {self.computed} cached "
                f"tokens (room for {self.max_tokens})"
            )
        new_tail_start = max(self.tail_start, (end // bs - w) * bs)
        middle = max(0, self.tail_start // bs - SINK_BLOCKS)
        chunk = RecallChunk(start, end, self.tail_start, new_tail_start, middle)
        self.tail_start, self.computed = new_tail_start, end
        self.decode_steps += end - start == 1
        if self.selecting(chunk):
            self.held.fill_(start - chunk.tail_start)
            self.middle.fill_(middle)
        return chunk

    def selecting(self, chunk: RecallChunk) -> bool:
        """A decode step past the prompt that picks among more middle blocks than the
        working set holds: the steady state its page decodes (page_decode.py), in every
        layer whose policy does not want all its keys first."""
        return self.static_decode and self.working_set is not None and self._past_budget(chunk)

    def samples(self, chunk: RecallChunk) -> bool:
        """A decode step past the prompt whose middle outgrows the budget, under a policy
        that then samples the middle (magicpig: sampled_attention.py)."""
        return self.policy.samples and self._past_budget(chunk)

    def _past_budget(self, chunk: RecallChunk) -> bool:
        """A decode step past the prompt with more middle blocks than the budget picks."""
        return (
            chunk.num_tokens == 1 and chunk.start >= self.prompt_tokens
            and chunk.num_middle > self.budget_blocks
        )  # fmt: skip

    # ---- device side, per layer ---------------------------------------------------------------

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: RecallChunk,
        scale: float, positions: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Store the chunk's k, v [T, KVH, D] of `layer` (tokens at `positions` [T], on the
        device) and attend its queries q [T, H, D]."""
        g = self.geometry
        if layer < g.dense_layers:
            self.dense.write(layer, k, v, chunk.start, positions)
            if self.publishes and chunk.end == self.prompt_tokens:
                write_prompt_blocks(self, layer, chunk)
            return self.dense.attend(layer, q, chunk.start, scale, positions)
        s = layer - g.dense_layers
        if self.selecting(chunk) and not self.policy.wants_all_keys(s):
            raise RuntimeError("a selecting decode step runs through the page (page_decode.py)")
        held = chunk.start - chunk.tail_start
        seg_k = torch.cat([self.tail_k[s, :, :held], k.transpose(0, 1).to(g.dtype)], dim=1)
        seg_v = torch.cat([self.tail_v[s, :, :held], v.transpose(0, 1).to(g.dtype)], dim=1)
        if self.samples(chunk):  # the sink and tail here, a sample of the middle on the host
            local_k = torch.cat([self.sink_k[s], seg_k], 1)
            local_v = torch.cat([self.sink_v[s], seg_v], 1)
            out = sampled_decode(
                self, s, q, local_k, local_v, chunk.num_middle, scale, chunk.start
            )  # fmt: skip
        else:
            pk, pv, mask = self._prefix(s, q, chunk)
            out = chunk_attention(
                q, torch.cat([pk, seg_k], 1), torch.cat([pv, seg_v], 1), mask, chunk.tail_start,
                chunk.start, scale,
            )  # fmt: skip
        self._retire(slice(s, s + 1), seg_k[None], seg_v[None], chunk)
        if chunk.end == self.prompt_tokens:
            if self.publishes:
                write_prompt_blocks(self, layer, chunk)
            self._ready_selection(s, chunk)
        return out

    def retire_after_decode(self, layers: slice, chunk: RecallChunk) -> None:
        """After its page decoded sparse layers `layers` (each wrote the token into its
        tail), the blocks leaving the tails retire, in every one of those layers at once."""
        if chunk.new_tail_start > chunk.tail_start:
            n = chunk.end - chunk.tail_start  # the tail holds them all now, in order
            seg_k = self.tail_k[layers, :, :n].clone()
            seg_v = self.tail_v[layers, :, :n].clone()
            self._retire(layers, seg_k, seg_v, chunk)

    def _prefix(
        self, s: int, q: torch.Tensor, chunk: RecallChunk
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values [KVH, n, D] before the tail (sink, then middle) and their mask."""
        g = self.geometry
        kvh, d = g.num_kv_heads, g.head_dim
        empty = self.sink_k.new_zeros((kvh, 0, d))
        if chunk.tail_start < g.block_size:
            return empty, empty, None
        keys, values = [self.sink_k[s]], [self.sink_v[s]]
        m, mask = chunk.num_middle, None  # mask None: every prefix key is attended
        decode = chunk.num_tokens == 1 and chunk.start >= self.prompt_tokens  # prefill: exact
        if m > 0 and decode and self.working_set is not None:
            held = self._recall(s, q[0], m)
            ws = self.working_set
            keys.append(ws.k[s].reshape(kvh, -1, d))
            values.append(ws.v[s].reshape(kvh, -1, d))
            sink = self.sink_k.shape[2]
            mask = picked_mask(held, g.block_size, sink, self.blocks_attended)
        elif m > 0:
            keys.append(self._stream(s, m, keys=True).view(kvh, -1, d))
            values.append(self._stream(s, m, keys=False).view(kvh, -1, d))
            if chunk.num_tokens == 1:
                self.blocks_attended += m * kvh
        return torch.cat(keys, 1), torch.cat(values, 1), mask

    def _ready_selection(self, s: int, chunk: RecallChunk) -> None:
        """At the end of the prompt, give a policy that wants every key of the layer (a
        basis fitted to the prompt) those keys, if the next step selects: the work is
        then part of the prefill, not of the first decode step."""
        middle = max(0, chunk.new_tail_start // self.geometry.block_size - SINK_BLOCKS)
        picks = self.working_set is not None or self.policy.samples
        if picks and middle > self.budget_blocks:
            self.give_all_keys(s, middle)

    def give_all_keys(self, s: int, m: int) -> None:
        """The keys of middle blocks 0..m-1 of sparse layer s, streamed from the host, to a
        policy that wants them all and has not had them."""
        if self.policy.wants_all_keys(s):
            self.policy.take_all_keys(s, self._stream(s, m, keys=True))
            if not self.publishes:  # else once its prompt is published (RecallManager.commit)
                self.give_back_keys()

    def give_back_keys(self) -> None:
        """Drop the key slots once the policy reads no key from the host any more."""
        if self.key_slots and not self.policy.needs_host_keys():
            self.store.give_back(self.owner, self.key_slots[::-1])  # deepest first
            self.key_slots = []

    def held_slots_deepest_first(self) -> list[int]:
        """The host slots it holds, from its last block to its first: released in this
        order, a shared prefix's deepest blocks are evicted first (host_store.py), and
        what stays cached is still a prefix, reusable from its first block."""
        keys, values = self.key_slots, self.value_slots
        return [s for b in reversed(range(len(values))) for s in (*keys[b : b + 1], values[b])]

    @property
    def keys_on_host(self) -> bool:
        """Whether the host store holds this sequence's keys (not only its values)."""
        return bool(self.key_slots) and self.policy.needs_host_keys()

    def _host_rows(self, s: int, blocks: torch.Tensor, keys: bool) -> torch.Tensor:
        """Flat host-store rows of the keys (or values) of middle blocks [KVH, n]."""
        table = self.key_slots_t if keys else self.value_slots_t
        return host_rows(self.store, table, s, blocks)

    def _recall(self, s: int, q: torch.Tensor, m: int) -> torch.Tensor:
        """Pick up to budget_blocks of the first m middle blocks per head for query q [H, D]
        and make the working set hold them; [KVH, budget_blocks] bool, the slots holding a
        pick. The growing form of a page's decode (page_decode.py), for the first step
        after the prompt and for steps with every block in budget (attended exactly)."""
        g, ws = self.geometry, self.working_set
        assert ws is not None
        n = self.budget_blocks
        exact = m <= n  # every block fits: attended exactly, keys from host
        if exact:
            picks = torch.arange(n, device=q.device).expand(g.num_kv_heads, n)
            picks = torch.where(picks < m, picks, -1)
        else:
            self.give_all_keys(s, m)
            grouped = q.view(g.num_kv_heads, g.group_size, g.head_dim)
            scores = self.policy.scores(s, grouped, m)
            if self.shard is not None:  # a replicated head's GQA group spans ranks
                scores = self.shard.max_over_replicas(scores)
            picks = torch.topk(scores, n, dim=1, sorted=False).indices  # all live ones
        held, moves = ws.update(s, picks)
        fill(ws, self.policy, self.store, self.key_slots_t, self.value_slots_t, s, moves, exact,
             self.bytes_fetched)  # fmt: skip
        return held

    def _stream(self, s: int, m: int, keys: bool) -> torch.Tensor:
        """The keys (or values) of middle blocks 0..m-1 of sparse layer s from the host
        store, [KVH, m, bs, D] on the compute device."""
        g = self.geometry
        if keys and not self.keys_on_host:
            raise RuntimeError("the host store no longer holds this sequence's keys")
        rows = read_blocks(self, g.dense_layers + s, SINK_BLOCKS, SINK_BLOCKS + m, keys)
        return rows.view(g.num_kv_heads, m, g.block_size, g.head_dim)

    def _store_middle(
        self, layers: slice, first: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Blocks first.. (keys, values [L, KVH, n, bs, D]) of sparse layers `layers` into
        their host slots (only values once the policy reads no key from the host). Sparse
        layer s is store layer s, so a layer further is num_slots * KVH rows further."""
        g = self.geometry
        num_layers, kvh, n = keys.shape[:3]
        middle = torch.arange(first - SINK_BLOCKS, first + n - SINK_BLOCKS, device=keys.device)
        blocks = middle[None, :].expand(kvh, n)
        src = torch.arange(num_layers * kvh * n, device=keys.device)
        host = self.store.flat()
        step = torch.arange(num_layers, device=keys.device) * (self.store.num_slots * kvh)
        parts = ((keys, True), (values, False)) if self.keys_on_host else ((values, False),)
        for part, are_keys in parts:
            rows = self._host_rows(layers.start, blocks, are_keys).flatten()
            dst = (step[:, None] + rows[None, :]).flatten()
            copy_rows(part.reshape(-1, g.block_size * g.head_dim), host, src, dst)

    def _retire(
        self, layers: slice, seg_k: torch.Tensor, seg_v: torch.Tensor, chunk: RecallChunk
    ) -> None:  # fmt: skip
        """Blocks leaving the tails of sparse layers `layers` go to the sink or the host
        store (with their summaries); the rest of seg becomes the tails. seg: tokens
        [tail_start, end) of each layer, [L, KVH, n, D]."""
        g = self.geometry
        bs, kvh, d = g.block_size, g.num_kv_heads, g.head_dim
        first, last = chunk.tail_start // bs, chunk.new_tail_start // bs
        if first < SINK_BLOCKS <= last:
            self.sink_k[layers] = seg_k[:, :, : SINK_BLOCKS * bs]
            self.sink_v[layers] = seg_v[:, :, : SINK_BLOCKS * bs]
        lo = max(first, SINK_BLOCKS)
        if lo < last:
            rel = (lo - first) * bs
            n = last - lo
            keys = seg_k[:, :, rel : rel + n * bs].reshape(-1, kvh, n, bs, d)
            values = seg_v[:, :, rel : rel + n * bs].reshape(-1, kvh, n, bs, d)
            new = max(0, min(n, last - self.on_host))  # the store lacks the last `new`
            if new > 0:
                self._store_middle(layers, last - new, keys[:, :, n - new :],
                                   values[:, :, n - new :])  # fmt: skip
            self.policy.summarize_layers(layers, lo - SINK_BLOCKS, keys)
        keep = chunk.new_tail_start - chunk.tail_start
        rest = seg_k.shape[2] - keep
        self.tail_k[layers, :, :rest] = seg_k[:, :, keep:]
        self.tail_v[layers, :, :rest] = seg_v[:, :, keep:]
