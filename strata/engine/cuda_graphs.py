"""CUDA graphs of the decode forward (embedding -> layers -> final norm -> lm_head).

A decode-only step of m rows replays the graph captured for the smallest size n >= m.
All graphs share one memory pool and one set of static buffers of the largest size N:

    tokens[0] input ids     [N] int64 \
    tokens[1] positions     [N] int64  } one [3, N] tensor: one copy per replay
    tokens[2] slot mapping  [N] int64 /   padding rows: id 0, position 0, slot -1
    attention metadata      the backend's static buffers (AttentionBackend.graph_metadata)
                            over tokens[2], bounded by max_model_len; per replay one
                            upload of seq_lens [n] int32 (padding rows: 0, attention
                            writes zeros) and block_tables [m, width] int32 refills them
                            (fill_graph_metadata)
    logits                  [N, vocab] float32, the graph's output

Only a graph-safe backend is captured: its launches depend on n and the static bound
alone, so every replay matches its capture. Sampling stays outside the graph.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from strata.attention.backend import AttentionBackend, AttentionMetadata
from strata.engine.feed import FeedGather
from strata.engine.staging import PinnedStager
from strata.kv.cache import KVCache
from strata.models.llama import LlamaModel

logger = logging.getLogger("strata.engine")


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself)."""
    sizes = [n for n in (1, 2, 4) if n < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv: KVCache,
        backend: AttentionBackend[Any],
        device: torch.device,
        max_batch: int,
        max_model_len: int,
    ) -> None:
        if not backend.graph_safe:
            raise ValueError(f"the {backend.name} attention backend is not graph-safe")
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.block_size = kv.block_size
        self.backend = backend
        n_max = self.max_batch
        self.tokens = torch.zeros(3, n_max, dtype=torch.long, device=device)
        self.tokens[2].fill_(-1)
        static = backend.graph_metadata(self.tokens[2], kv.block_size, max_model_len)
        # Per captured size n: the first n rows of the static metadata.
        self._meta: dict[int, AttentionMetadata] = {
            n: backend.graph_rows(static, n) for n in self.sizes
        }
        self.logits = torch.zeros(n_max, model.config.vocab_size, device=device)
        self.rows = torch.arange(n_max, device=device)  # logits rows: every row samples
        self._ints = PinnedStager(device, torch.long)
        self._int32 = PinnedStager(device, torch.int32)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture(model, kv, device)

    def _capture(self, model: LlamaModel, kv: KVCache, device: torch.device) -> None:
        torch.cuda.synchronize(device)
        free_before = torch.cuda.mem_get_info(device)[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            meta = self._meta[n]
            args = (self.tokens[0, :n], self.tokens[1, :n], kv, self.backend, meta, self.rows[:n])
            self.logits[:n].copy_(model(*args))  # compiles kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[:n].copy_(model(*args))
            self._graphs[n] = graph
        torch.cuda.synchronize(device)
        used = free_before - torch.cuda.mem_get_info(device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s, %.0f MiB",
            len(self.sizes), self.sizes[0], self.max_batch, time.perf_counter() - start,
            used / (1 << 20),
        )  # fmt: skip

    def padded_size(self, m: int) -> int:
        return next(n for n in self.sizes if n >= m)

    def run(
        self,
        ids: list[int],
        positions: np.ndarray,
        slots: np.ndarray,
        tables: list[list[int]],
        feed: FeedGather | None = None,
    ) -> torch.Tensor:
        """Replay for m = len(ids) decode rows; logits [m, vocab], valid until the next run.

        positions[i] is row i's new token position, so its context is positions[i] + 1.
        `feed` writes the in-flight step's tokens over their rows' ids (engine/feed.py).
        """
        m = len(ids)
        n = self.padded_size(m)
        tokens = np.zeros((3, n), dtype=np.int64)
        tokens[0, :m], tokens[1, :m], tokens[2, :m] = ids, positions, slots
        tokens[2, m:] = -1
        lens = np.zeros(n, dtype=np.int32)
        lens[:m] = positions + 1
        width = int(-(-lens.max() // self.block_size))
        table = np.zeros((m, width), dtype=np.int32)
        for r, t in enumerate(tables):
            row = t[:width]
            table[r, : len(row)] = row
        if feed is None:
            (tok_dev,) = self._ints.upload([tokens])
        else:
            tok_dev, rows_dev, sources_dev = self._ints.upload([tokens, feed.rows, feed.sources])
        lens_dev, table_dev = self._int32.upload([lens, table])
        self.tokens[:, :n].copy_(tok_dev)
        if feed is not None:
            feed.apply(self.tokens[0], rows_dev, sources_dev)
        self.backend.fill_graph_metadata(self._meta[n], lens_dev, table_dev)
        self._graphs[n].replay()
        return self.logits[:m]
