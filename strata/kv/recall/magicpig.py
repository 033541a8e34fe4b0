"""MagicPIG (Chen et al., ICLR'25) on the recall store: LSH sampling, attention over the
sampled keys on the host.

Per sparse layer:

    mean    [kv_heads, dim] float32, GPU   the mean post-RoPE key of the prompt's middle
                                           blocks; keys are hashed centred on it
    tables  HashTables, host               every middle token's SimHash codes, BITS bits x
                                           TABLES tables, sorted per head and table (lsh.py)

plus one [dim, BITS * TABLES] projection shared by every layer. A decode step whose
middle is larger than the budget hashes each query head on the GPU; the host samples the
middle tokens colliding with it in at least two tables and attends them, each weighted
by 1 / its sampling probability, from the host store's keys and values
(sampled_attention.py); the GPU attends the sink and the tail, and the two parts merge by
their log-sum-exp. A middle within the budget is attended exactly, streamed from the host
(as full_offload). Nothing is picked: no working set, no pages, no summaries' scores.

A layer's mean and tables are made once, when its middle first outgrows the budget (the
prompt's end, as shadowkv's basis; `take_all_keys`); the codes go to the host and the
tables are sorted on a worker thread, off the engine thread, until first needed. Blocks
that retire later are hashed on the GPU and appended unsorted; once RESORT_TOKENS have
gathered, a worker sorts them in, and the sorted tables replace the old ones when ready.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from strata.attention.layer_inputs import Rotary
from strata.kv.recall.buffers import Buffers, OwnBuffers
from strata.kv.recall.lsh import HashTables, hash_codes, projection
from strata.kv.recall.policy import RecallPolicy, SummaryRoom

BITS = 10  # K, bits of a table's code (MagicPIG: K=10, L=150, about 2% of the keys)
TABLES = 150  # L
RESORT_TOKENS = 4096  # unsorted codes a layer gathers before a worker sorts them in

# layers' tables sort side by side (torch's sort lets go of the GIL)
_TABLE_BUILDER = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                    thread_name_prefix="strata-lsh")  # fmt: skip


class MagicPIGPolicy(RecallPolicy):
    name = "magicpig"
    selects = False
    samples = True
    bits, num_tables = BITS, TABLES

    def __init__(self) -> None:
        self.room: SummaryRoom | None = None
        self.tables: list[HashTables | None] = []
        self.resorting: list[Future[HashTables] | None] = []
        self.building: list[Future[HashTables] | None] = []
        self.means_on_host: list[torch.Tensor] = []  # each layer's mean, on the host

    def allocate(
        self, room: SummaryRoom, rope: Rotary | None = None, buffers: Buffers | None = None
    ) -> None:
        if room.shard is not None:
            raise ValueError("magicpig attends on one host: it does not run tensor-parallel")
        buffers = buffers or OwnBuffers(room.device)
        self.room = room
        shape = (room.layers, room.kv_heads, room.head_dim)
        self.mean = buffers.tensor("magicpig.mean", shape, torch.float32, layered=True)
        self.proj = projection(room.head_dim, BITS, TABLES, room.device)
        self.tables = [None] * room.layers
        self.resorting = [None] * room.layers
        self.building = [None] * room.layers
        self.means_on_host = [torch.zeros(0)] * room.layers

    @staticmethod
    def summary_bytes(room: SummaryRoom) -> int:
        mean = room.layers * room.kv_heads * room.head_dim * 4
        return mean + room.head_dim * BITS * TABLES * 4

    @staticmethod
    def host_bytes_per_token(kv_heads: int, layers: int) -> int:
        """Host bytes of a token's codes and sorted ids, every head and sparse layer."""
        return layers * kv_heads * TABLES * (2 + 4)

    @staticmethod
    def host_bytes(room: SummaryRoom) -> int:
        tokens = room.max_blocks * room.block_size
        return tokens * MagicPIGPolicy.host_bytes_per_token(room.kv_heads, room.layers)

    def wants_all_keys(self, layer: int) -> bool:
        return self.tables[layer] is None and self.building[layer] is None

    def take_all_keys(self, layer: int, keys: torch.Tensor) -> None:
        """The layer's mean over every middle key so far (keys [kv_heads, n, bs, dim]), and
        their codes, sorted into tables on a worker."""
        kvh, n, bs, d = keys.shape
        flat = keys.float().reshape(kvh, n * bs, d)
        self.mean[layer] = flat.mean(dim=1)
        self.means_on_host[layer] = self.mean[layer].cpu()
        codes = self._codes(layer, flat).cpu()
        self.building[layer] = _TABLE_BUILDER.submit(HashTables, codes, BITS)

    def summarize(self, layer: int, first: int, keys: torch.Tensor) -> None:
        self.summarize_layers(slice(layer, layer + 1), first, keys[None])

    def summarize_layers(self, layers: slice, first: int, keys: torch.Tensor) -> None:
        """Hash blocks first.. (keys [L, kv_heads, n, bs, dim]) of the layers with tables,
        and add them; blocks a layer's tables already hold are skipped."""
        _, kvh, n, bs, d = keys.shape
        for i, layer in enumerate(range(layers.start, layers.stop)):
            tables = self.tables_of(layer) if not self.wants_all_keys(layer) else None
            if tables is None:
                continue
            skip = tables.num_tokens - first * bs
            if skip >= n * bs:
                continue
            flat = keys[i].float().reshape(kvh, n * bs, d)[:, max(0, skip) :]
            tables.append(self._codes(layer, flat).cpu())
            if tables.tail.shape[1] >= RESORT_TOKENS and self.resorting[layer] is None:
                self.resorting[layer] = _TABLE_BUILDER.submit(tables.resorted)

    def tables_of(self, layer: int) -> HashTables:
        """The layer's tables (waiting for a build; taking a finished sort)."""
        building = self.building[layer]
        if building is not None:
            self.tables[layer], self.building[layer] = building.result(), None
        resorting = self.resorting[layer]
        tables = self.tables[layer]
        assert tables is not None, "magicpig tables before take_all_keys"
        if resorting is not None and resorting.done():
            sorted_tables = resorting.result()
            newer = tables.codes_from(sorted_tables.num_tokens)
            if newer.shape[1]:
                sorted_tables.append(newer)
            self.tables[layer], self.resorting[layer] = sorted_tables, None
            tables = sorted_tables
        return tables

    def mean_on_host(self, layer: int) -> torch.Tensor:
        return self.means_on_host[layer]

    def query_codes(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """[heads, TABLES] int16 codes of the queries q [heads, dim], on q's device."""
        return hash_codes(q, self.proj, BITS)

    def _codes(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Codes [kv_heads, n, TABLES] of keys [kv_heads, n, dim] centred on the layer's mean."""
        return hash_codes(keys - self.mean[layer][:, None, :], self.proj, BITS)

    def scores(
        self, layer: int, q: torch.Tensor, num_blocks: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise TypeError("magicpig samples keys on the host: it never scores blocks")
