"""RecallManager: the engine's recall store and the recall sequences over it.

    attach   a request under a recall policy gets a RecallKV: its budget in blocks and
             what it will need (a key and a value host slot for every block it can
             have, GPU bytes);
             a request that could never fit is refused at once, naming both numbers
    admit    (scheduler) its GPU state is allocated and its host slots reserved, or it
             waits while running sequences hold the memory
    commit   (after each step) a sequence that computed its prompt publishes its full
             prompt blocks (prefix_sharing.py), then gives its key slots back if its
             policy stops reading keys from the host (shadowkv: sequence.py)
    release  (finish, abort) both are given back at once; a preempted sequence keeps them

With prefix sharing (`sharing`, off under tensor parallelism) a request's leading prompt
blocks that the store has published are reused at admission: it holds references on
their host slots and needs new slots only for the rest. Host slots nobody holds but
that stay published are cached, and count as available: allocating evicts them.

Under tensor parallelism every rank holds such a manager over its own KV heads; rank 0's
decides, and each admitted sequence gets a serial number by which the workers mirror it
(wire.py, mirror.py): `release_listeners` tells them of each release, in order.

The sequence holds no block of the paged GPU pool: its KV lives in the host store and
its own GPU state (sequence.py), so a recall sequence is never swapped and never waits
for pool blocks. That state is one row of a page (page.py) shared with sequences of the
same policy, budget and length, which decode together; a page reserves its rows' GPU
bytes while it holds any, and goes when its last row is released.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from strata.attention.layer_inputs import Rotary
from strata.errors import InvalidRequestError
from strata.kv.policies.budget import tokens_allowed
from strata.kv.prefix import BlockRef
from strata.kv.recall.geometry import RecallGeometry
from strata.kv.recall.host_store import HostKVStore
from strata.kv.recall.page import PageKey, RecallPage
from strata.kv.recall.page_decode import PageDecoder
from strata.kv.recall.policy import SummaryRoom
from strata.kv.recall.prefix_copy import load_prefix
from strata.kv.recall.prefix_sharing import PrefixSharing
from strata.kv.recall.ranks import HeadShard
from strata.kv.recall.registry import RECALL_POLICIES
from strata.kv.recall.report import integrity_problems, recall_stats, sequence_counters
from strata.kv.recall.sequence import RecallSequence
from strata.kv.sizing import format_bytes


@dataclass
class RecallKV:
    """A request's recall policy, and its GPU state while admitted."""

    policy: str
    budget_blocks: int
    max_tokens: int
    host_blocks: int  # blocks it can have: a key slot and a value slot each
    gpu_bytes: int
    prompt_tokens: int
    state: RecallSequence | None = None
    prompt_blocks: tuple[BlockRef, ...] = ()  # its full prompt blocks' keys (when sharing)
    published: bool = False  # its prompt blocks went to the store's index
    table_bytes: int = 0  # host bytes of the policy's own beside the store (magicpig)

    @property
    def host_slots(self) -> int:
        """Host slots it takes when admitted."""
        return 2 * self.host_blocks


class RecallManager:
    def __init__(
        self, geometry: RecallGeometry, store: HostKVStore, gpu_budget: int, device: torch.device,
        rope: Rotary | None = None, graphs: bool = False, shard: HeadShard | None = None,
        page_rows: int = 4, prefix_root: bytes | None = None,
    ) -> None:  # fmt: skip
        """prefix_root: the engine's block-key root, to share prompt blocks in the store
        (whose slots must then span every layer); None: no sharing."""
        self.geometry, self.store, self.device = geometry, store, device
        self.sharing: PrefixSharing | None = None
        if prefix_root is not None and geometry.sparse_layers:
            if store.num_layers != geometry.num_layers:
                raise ValueError("a recall store sharing prefixes keeps every layer")
            self.sharing = PrefixSharing(prefix_root, geometry.block_size)
        self.blocks_reused = self.blocks_published = 0  # prompt blocks, so far
        self.shard = shard  # tensor parallelism: this rank's KV heads (ranks.py)
        # CUDA graphs of selecting decode steps (layer_graphs.py): one capture stream
        self._graph_stream: torch.cuda.Stream | None = None
        if graphs and device.type == "cuda":
            self._graph_stream = torch.cuda.Stream(device)
        self.rope = rope  # the model's rotary tables, for policies that undo RoPE
        self.gpu_budget = gpu_budget
        self.gpu_used = 0
        # host bytes of policies' own structures beside the store (magicpig's tables): at
        # most as much as the store, reserved at admission like its slots
        self.table_budget, self.table_used = store.nbytes, 0
        self.live: dict[str, RecallKV] = {}  # by request id: attached, admitted or not
        self.page_rows = page_rows  # rows of a new page (page.py), as the budget allows
        self.pages: list[RecallPage] = []  # each holding a row or more
        self._serials = 0  # admissions so far: the next sequence's serial
        # told each release's serial, in order: the workers' mirrors, step graphs
        self.release_listeners: list[Callable[[int], None]] = []
        self.retired = {  # the counters of released sequences (report.py adds the live ones)
            "hits": 0, "misses": 0, "bytes_fetched": 0, "blocks_attended": 0, "decode_steps": 0,
            "graph_replays": 0, "bytes_prefetched": 0, "keys_sampled": 0, "sampled_on_host": 0,
            "sampled_on_device": 0, "sampled_host_seconds": 0.0, "sampled_wait_seconds": 0.0,
        }  # fmt: skip
        # theirs too: per sparse layer, picks the prefetch had guessed, and picks
        self.retired_prefetch = torch.zeros((2, geometry.sparse_layers), dtype=torch.long)

    # ---- requests --------------------------------------------------------------------------

    def plan_for(
        self, policy: str, budget: float, num_prompt: int, max_tokens: int,
        prompt: Sequence[int] = (), salt: str | None = None,
    ) -> RecallKV:  # fmt: skip
        """The RecallKV of a request, or InvalidRequestError if it can never fit. prompt,
        salt: its prompt tokens and cache partition, to share its prefix in the store."""
        g = self.geometry
        RECALL_POLICIES.check(policy)
        if self.shard is not None and RECALL_POLICIES.get(policy).samples:
            raise InvalidRequestError(
                f"kv_policy {policy!r} attends its samples on one host: it does not run under "
                "tensor parallelism"
            )
        total = num_prompt + max_tokens
        # Room for every middle block it can have; none when every layer is dense.
        host_blocks = g.max_blocks(total) if g.sparse_layers else 0
        budget_blocks = min(g.budget_blocks(tokens_allowed(budget, num_prompt)), host_blocks)
        kv = self.kv_for(policy, budget_blocks, total, host_blocks, num_prompt)
        if self.sharing is not None and prompt:
            kv.prompt_blocks = self.sharing.prompt_blocks(prompt[:num_prompt], salt)
        gpu = kv.gpu_bytes
        if kv.host_slots > self.store.num_slots:
            need = kv.host_slots * self.store.bytes_per_slot
            raise InvalidRequestError(
                f"kv_policy {policy!r}: {total} tokens (prompt + max_tokens) need "
                f"{format_bytes(need)} of host memory, but the recall store holds "
                f"{format_bytes(self.store.nbytes)} (kv_recall_host_memory); lower max_tokens "
                "or raise --kv-recall-host-memory"
            )
        if kv.table_bytes > self.table_budget:
            raise InvalidRequestError(
                f"kv_policy {policy!r}: {total} tokens need {format_bytes(kv.table_bytes)} of "
                f"host memory for its tables beside the store, which may take "
                f"{format_bytes(self.table_budget)} (as much as kv_recall_host_memory)"
            )
        if gpu > self.gpu_budget:
            raise InvalidRequestError(
                f"kv_policy {policy!r}: {total} tokens need {format_bytes(gpu)} of GPU memory "
                f"for their dense layers, summaries and working set, but recall sequences "
                f"have {format_bytes(self.gpu_budget)} (kv_recall_gpu_memory)"
            )
        return kv

    def kv_for(
        self, policy: str, budget_blocks: int, max_tokens: int, host_blocks: int, num_prompt: int
    ) -> RecallKV:
        """A RecallKV of these numbers, with the GPU bytes it takes on this rank."""
        g = self.geometry
        cls = RECALL_POLICIES.get(policy)
        room = SummaryRoom(
            g.sparse_layers, g.num_kv_heads, g.room_blocks(host_blocks), g.head_dim,
            g.block_size, g.dtype, budget_blocks, landmark_tokens=g.landmark_tokens,
            shard=self.shard, quest_page_tokens=g.quest_page_tokens,
        )  # fmt: skip
        gpu = g.dense_bytes(max_tokens) + g.resident_bytes() + cls.summary_bytes(room)
        if cls.selects:
            gpu += g.working_set_bytes(g.working_set_slots(budget_blocks))
        kv = RecallKV(policy, budget_blocks, max_tokens, host_blocks, gpu, num_prompt)
        kv.table_bytes = cls.host_bytes(room)
        return kv

    def admit(
        self, request_id: str, kv: RecallKV, serial: int | None = None, waiting: int = 1,
        capacity: int | None = None, reuse_limit: int | None = None,
    ) -> bool:  # fmt: skip
        """Give the sequence a row of a page (a new page if none of its kind has one free)
        and reserve its host slots, reusing the published blocks its prompt starts with
        (its state then holds them: `state.computed` tokens); False (nothing changed) if
        GPU memory or host slots are short now. waiting: sequences of its kind waiting to
        be admitted, itself included (they size a new page). serial, capacity: rank 0's,
        for a worker's mirror (its new page's rows); by default the next serial of this
        manager's own. reuse_limit: the most prompt tokens it may reuse (prompt positions
        it still has to score must be computed)."""
        if kv.state is not None:
            raise RuntimeError(f"recall sequence {request_id!r} admitted twice")
        reused = []
        if self.sharing is not None:
            blocks = kv.prompt_blocks
            if reuse_limit is not None:
                blocks = blocks[: reuse_limit // self.geometry.block_size]
            reused = self.sharing.reusable(self.store, blocks, kv.prompt_tokens)
        shared = [slot for block in reused for slot in block.slots]
        fresh = kv.host_slots - len(shared)  # holding a cached slot takes it from the rest
        if fresh > self.store.num_available - self.store.num_unheld(shared):
            return False
        if self.table_used + kv.table_bytes > self.table_budget:
            return False
        dense = self.geometry.dense_bytes(kv.max_tokens)
        page = self._page_with_room(kv, dense, waiting, capacity)
        if page is None:
            return False
        if serial is None:
            serial, self._serials = self._serials, self._serials + 1
        self.store.hold(request_id, shared)
        slots = self.store.allocate(request_id, fresh)
        row = page.free_row()
        assert row is not None
        n = kv.host_blocks - len(reused)
        kv.state = RecallSequence(
            self.geometry, RECALL_POLICIES.get(kv.policy)(), kv.budget_blocks, kv.max_tokens,
            self.store, shared[0::2] + slots[:n], shared[1::2] + slots[n:], page, row,
            request_id, self.rope, kv.prompt_tokens, serial, self.shard,
            publishes=self.sharing is not None,
        )  # fmt: skip
        if reused:
            load_prefix(kv.state, len(reused))
            self.blocks_reused += len(reused)
        if page.decoder is None and kv.state.working_set is not None:
            page.decoder = PageDecoder(
                page, self.geometry, RECALL_POLICIES.get(kv.policy)(),
                kv.state.room, self.rope, self.store, self.shard,
            )  # fmt: skip
        self.gpu_used += dense
        self.table_used += kv.table_bytes
        self.live[request_id] = kv
        return True

    def kind(self, kv: RecallKV) -> PageKey:
        """What sequences sharing a page have in common (page.py)."""
        return kv.policy, kv.budget_blocks, self.geometry.room_blocks(kv.host_blocks)

    def _page_with_room(
        self, kv: RecallKV, dense: int, waiting: int, capacity: int | None
    ) -> RecallPage | None:
        """A page of kv's kind with a free row, or a new one if the GPU budget allows, or
        None. A new page gets as many rows as its kind has sequences live or waiting (so
        at most about half its rows sit empty), up to page_rows and what the budget fits
        (each row with its sequence's dense layers)."""
        free = self.gpu_budget - self.gpu_used - dense
        key = self.kind(kv)
        for page in self.pages:
            if page.key == key and page.free_row() is not None:
                return page if free >= 0 else None
        fit = (self.gpu_budget - self.gpu_used) // max(1, kv.gpu_bytes)
        if capacity is None:  # rank 0 (or alone): decide
            live = sum(p.capacity for p in self.pages if p.key == key)  # all full
            capacity = min(self.page_rows, live + waiting, fit)
        if not 1 <= capacity <= fit:
            return None
        page = RecallPage(key, capacity, kv.gpu_bytes - dense, self.device, self._graph_stream)
        self.pages.append(page)
        self.gpu_used += page.nbytes
        return page

    def commit(self, request_id: str) -> None:
        """After a step that computed some of the sequence's tokens: once its prompt is
        computed, its full prompt blocks are published; then its key slots go back if its
        policy reads no more keys from the host."""
        kv = self.live.get(request_id)
        state = None if kv is None else kv.state
        if kv is None or state is None:
            return
        if self.sharing is not None and not kv.published and state.computed >= kv.prompt_tokens:
            self.blocks_published += self.sharing.publish(self.store, kv.prompt_blocks, state)
            kv.published = True
        state.give_back_keys()

    def release(self, request_id: str) -> None:
        """Give back a sequence's row (its page, once empty) and its references on host
        slots (a no-op if it holds none): a slot nobody holds is free, or cached if
        published."""
        kv = self.live.pop(request_id, None)
        if kv is not None and kv.state is not None:
            self.store.give_back(request_id, kv.state.held_slots_deepest_first())
        self.store.free(request_id)
        if kv is None or kv.state is None:
            return
        for name, value in sequence_counters(kv.state).items():
            self.retired[name] += value
        self.retired_prefetch += kv.state.prefetch_counts.cpu()
        page = kv.state.page
        page.give_back(request_id)
        if page.empty:
            if page.graphs is not None:
                self.retired["graph_replays"] += page.graphs.replays
            page.release()
            self.pages.remove(page)
            self.gpu_used -= page.nbytes
        for listener in self.release_listeners:
            listener(kv.state.serial)
        kv.state = None
        self.gpu_used -= self.geometry.dense_bytes(kv.max_tokens)
        self.table_used -= kv.table_bytes

    # ---- observability (report.py) ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return recall_stats(self)

    def gpu_bytes_of(self, request_id: str) -> int:
        """GPU bytes a request's recall state holds now (0 if none): dense layers, sink,
        tail, summaries and working set."""
        kv = self.live.get(request_id)
        return kv.gpu_bytes if kv is not None and kv.state is not None else 0

    def state_of(self, request_id: str) -> RecallSequence | None:
        kv = self.live.get(request_id)
        return None if kv is None else kv.state

    def live_ids(self) -> set[str]:
        """The requests holding recall state now."""
        return set(self.live)

    def check_integrity(self) -> list[str]:
        return integrity_problems(self)
