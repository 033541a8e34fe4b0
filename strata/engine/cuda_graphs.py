"""CUDA graphs of the decode forward (embedding -> layers -> final norm -> lm_head).

A decode-only step of m rows replays the graph captured for the smallest size n >= m.
All graphs share one memory pool and one set of static buffers of the largest size N:

    tokens[0] input ids     [N] int64 \
    tokens[1] positions     [N] int64  } one [3, N] tensor: one copy per replay
    tokens[2] slot mapping  [N] int64 /   padding rows: id 0, position 0, slot -1
    seq_lens                [N] int32     padding rows: 0 (attention writes zeros)
    block_tables            [N, W] int32  rows < m, columns < the live width are
                                          rewritten; kernels never read further
    logits                  [N, vocab] float32, the graph's output

The decode grid depends only on n and the static max_seq_len bound (max_model_len), so
every replay matches its capture (see strata/attention/triton_meta.py). Sampling stays
outside the graph.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from strata.attention.backend import AttentionBackend
from strata.attention.triton_meta import DecodeMetadata, TritonMetadata
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
        backend: AttentionBackend,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
    ) -> None:
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.block_size = kv.block_size
        n_max = self.max_batch
        width = -(-max_model_len // kv.block_size)
        self.tokens = torch.zeros(3, n_max, dtype=torch.long, device=device)
        self.tokens[2].fill_(-1)
        self.decode = DecodeMetadata.allocate(n_max, width, max_model_len, device)
        self.logits = torch.zeros(n_max, model.config.vocab_size, device=device)
        self.rows = torch.arange(n_max, device=device)  # logits rows: every row samples
        self._ints = PinnedStager(device, torch.long)
        self._int32 = PinnedStager(device, torch.int32)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture(model, kv, backend, device, max_model_len)

    def _meta(self, n: int, max_model_len: int) -> TritonMetadata:
        d = self.decode
        rows = DecodeMetadata(d.query_rows[:n], d.seq_lens[:n], d.block_tables[:n], max_model_len)
        return TritonMetadata(self.tokens[2, :n], self.block_size, rows, None)

    def _capture(
        self,
        model: LlamaModel,
        kv: KVCache,
        backend: AttentionBackend,
        device: torch.device,
        max_model_len: int,
    ) -> None:
        torch.cuda.synchronize(device)
        free_before = torch.cuda.mem_get_info(device)[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            meta = self._meta(n, max_model_len)
            args = (self.tokens[0, :n], self.tokens[1, :n], kv, backend, meta, self.rows[:n])
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
    ) -> torch.Tensor:
        """Replay for m = len(ids) decode rows; logits [m, vocab], valid until the next run.

        positions[i] is row i's new token position, so its context is positions[i] + 1.
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
        (tok_dev,) = self._ints.upload([tokens])
        lens_dev, table_dev = self._int32.upload([lens, table])
        self.tokens[:, :n].copy_(tok_dev)
        self.decode.seq_lens[:n].copy_(lens_dev)
        self.decode.block_tables[:m, :width].copy_(table_dev)
        self._graphs[n].replay()
        return self.logits[:m]
