"""ModelRunner: turns a StepPlan into tensors, runs the model and samples.

Per step it builds, for the flat batch of the plan's chunks in order:
    input_ids, positions, slot_mapping  [tokens]
    logits_rows                         [sampling chunks]  last token of each such chunk
and the attention backend's metadata from the chunks' block tables. Host-side tensors
are built in pinned memory on CUDA and copied without blocking.
"""

from __future__ import annotations

import numpy as np
import torch

from strata.attention.backend import AttentionBackend, BatchLayout
from strata.engine.plan import StepPlan
from strata.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from strata.kv.cache import KVCache
from strata.models.llama import LlamaModel


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv: KVCache, backend: AttentionBackend, device: torch.device
    ) -> None:
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device
        self.sampler = Sampler()
        self._pin = device.type == "cuda"

    def _to_device(self, array: np.ndarray | list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(array, dtype=dtype)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def execute(self, plan: StepPlan) -> SamplerOutput | None:
        """Run one step. Returns sampled tokens for the plan's sampling chunks, in order."""
        logits = self.compute_logits(plan)
        if logits is None:
            return None
        return self.sampler(logits, self._sampling_batch(plan))

    def compute_logits(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the model for one step; float32 logits of the sampling chunks, in order."""
        bs = self.kv.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        logits_rows: list[int] = []
        offset = 0
        for chunk in plan.chunks:
            seq = chunk.seq
            ids.extend(seq.token_ids[chunk.start : chunk.end])
            pos = np.arange(chunk.start, chunk.end, dtype=np.int64)
            table = np.asarray(chunk.block_table[: -(-chunk.end // bs)], dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            offset += chunk.num_tokens
            if chunk.samples:
                logits_rows.append(offset - 1)
        layout = BatchLayout(
            query_lens=[c.num_tokens for c in plan.chunks],
            context_lens=[c.end for c in plan.chunks],
            block_tables=[c.block_table for c in plan.chunks],
            block_size=bs,
        )
        slot_mapping = self._to_device(np.concatenate(slots), torch.long)
        meta = self.backend.prepare(layout, slot_mapping, self.device)
        logits = self.model(
            self._to_device(ids, torch.long),
            self._to_device(np.concatenate(positions), torch.long),
            self.kv,
            self.backend,
            meta,
            self._to_device(logits_rows, torch.long),
        )
        return logits if logits_rows else None

    def _sampling_batch(self, plan: StepPlan) -> SamplingBatch:
        seqs = [c.seq for c in plan.chunks if c.samples]
        params = [s.params for s in seqs]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperature=self._to_device([p.temperature for p in params], torch.float32),
            top_p=self._to_device([p.top_p for p in params], torch.float32),
            top_k=self._to_device([max(p.top_k, 0) for p in params], torch.long),
            seed=self._to_device([s.seed for s in seqs], torch.long),
            step=self._to_device([s.num_output_tokens for s in seqs], torch.long),
            all_greedy=all(p.greedy for p in params),
            any_top_p_or_k=any(p.top_p < 1.0 or p.top_k > 0 for p in params),
            max_logprobs=max(wanted, default=-1),
        )
