"""GPU warm-up: the peak memory of the largest step, measured before sizing the KV pool."""

from __future__ import annotations

from typing import Any

import torch

from strata.attention.backend import AttentionBackend, BatchLayout
from strata.engine.sampler import Sampler, SamplingBatch
from strata.engine.sampling_params import SamplingParams
from strata.kv.cache import KVCache
from strata.models.placement import ModelPlacement


def warmup_peak_bytes(placed: ModelPlacement, backend: AttentionBackend[Any]) -> int:
    """Run one full-budget prefill step plus sampling on a scratch KV cache; return the
    peak bytes allocated by torch, scratch cache excluded."""
    device, sched, block_size = placed.device, placed.scheduler, placed.block_size
    tokens = min(sched.max_num_batched_tokens, placed.max_model_len)
    rows = min(sched.max_num_seqs, tokens)
    num_blocks = -(-tokens // block_size)
    scratch = KVCache(placed.model_config, num_blocks, block_size, placed.dtype, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    layout = BatchLayout([tokens], [tokens], [list(range(num_blocks))], block_size)
    slots = torch.arange(tokens, device=device)
    meta = backend.prepare(layout, slots, device)
    ids = torch.randint(0, placed.model_config.vocab_size, (tokens,), device=device)
    logits_rows = torch.arange(tokens - rows, tokens, device=device)
    logits = placed.model(ids, slots, scratch, backend, meta, logits_rows)
    batch = SamplingBatch(
        temperature=torch.full((rows,), 0.7, device=device),
        top_p=torch.full((rows,), 0.9, device=device),
        top_k=torch.full((rows,), 50, device=device, dtype=torch.long),
        seed=torch.arange(rows, device=device),
        step=torch.zeros(rows, device=device, dtype=torch.long),
        all_greedy=False,
        any_top_p_or_k=True,
        max_logprobs=SamplingParams.MAX_LOGPROBS,
    )
    Sampler()(logits, batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch.nbytes
    del scratch, logits, meta
    torch.cuda.empty_cache()
    return max(peak, before)
