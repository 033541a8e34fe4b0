"""Token sampling for a batch of rows with per-row parameters, without host syncs.

Random draws are counter-based: the noise for (request seed, output index, token id) is
a fixed integer hash, so a seeded request samples the same tokens whatever batch it
runs in and however often it is preempted and recomputed. Sampling uses the
exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.

Order: the batch's LogitsAdjustment (penalties, logit_bias, bans) changes the logits,
then its GrammarMasks set the tokens each constrained row's grammar forbids to -inf;
greedy rows take their argmax and logprobs are of these adjusted logits (before
temperature); sampled rows then apply temperature, min_p, top-k and top-p. A row that
masks and bans leave no token samples -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.engine.grammar_mask import GrammarMasks
from strata.engine.logits_adjust import LogitsAdjustment
from strata.engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as device tensors, plus host-known batch-wide flags."""

    temperature: torch.Tensor  # [rows] float32; 0 = greedy
    top_p: torch.Tensor  # [rows] float32
    top_k: torch.Tensor  # [rows] int64; 0 = disabled
    seed: torch.Tensor  # [rows] int64 in [0, 2^32)
    step: torch.Tensor  # [rows] int64: index of the token being sampled in the output
    all_greedy: bool
    any_top_p_or_k: bool
    max_logprobs: int  # -1: no row wants logprobs
    min_p: torch.Tensor | None = None  # [rows] float32; None when no row sets it
    adjust: LogitsAdjustment | None = None  # penalties, biases and bans; None: none
    grammar: GrammarMasks | None = None  # constrained rows' token bitmasks; None: none


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] int64
    logprobs: torch.Tensor | None  # [rows] chosen token's log-probability
    top_ids: torch.Tensor | None  # [rows, max_logprobs]
    top_logprobs: torch.Tensor | None  # [rows, max_logprobs]


def check_sampling_row(params: SamplingParams, seed: int) -> None:
    """Raise ValueError unless one request's sampling values fit the batch's tensors
    (float32 temperature and top_p, int64 top_k, a 32-bit seed). SamplingParams checks
    them at admission; this guards the step against a request that slipped past."""
    if not (params.temperature >= 0 and params.temperature != float("inf")):
        raise ValueError(f"temperature {params.temperature} is not a finite number >= 0")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p {params.top_p} is not in (0, 1]")
    if not -1 <= params.top_k < 2**63:
        raise ValueError(f"top_k {params.top_k} does not fit in 64 bits")
    if not 0 <= seed <= _MASK32:
        raise ValueError(f"seed {seed} is not in [0, 2^32)")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of 32-bit values held in int64 (products wrap; low bits are exact)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 in (0, 1), a pure function of (seed, step, token id). On CUDA
    one Triton kernel computes it (strata/ops/triton_sampling_noise.py), bit for bit."""
    if seed.is_cuda:
        from strata.ops.triton_sampling_noise import uniform_noise as fused

        return fused(seed, step, vocab)
    return uniform_noise_torch(seed, step, vocab)


def uniform_noise_torch(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """uniform_noise in torch operations (any device)."""
    row = _mix32(_mix32(seed) ^ _mix32(step + 0x9E3779B9))
    col = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    bits = _mix32(row[:, None] ^ (col[None, :] * 0x85EBCA6B))
    # 23 bits -> (0, 1): (k + 0.5) / 2^23 is exact in float32, so never 0 or 1.
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [rows, vocab] float32 -> chosen tokens (and logprobs if asked)."""
        if batch.adjust is not None:
            logits = batch.adjust.apply(logits)
        if batch.grammar is not None:
            logits = batch.grammar.apply(logits)
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            tokens = greedy
        else:
            tokens = torch.where(batch.temperature == 0, greedy, self._sample(logits, batch))
        chosen = top_ids = top_lp = None
        if batch.max_logprobs >= 0:
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
            top_lp, top_ids = logprobs.topk(max(batch.max_logprobs, 1), dim=-1)
        if batch.grammar is not None or batch.adjust is not None:
            # a row whose grammar and bans allow nothing samples -1 (finishing.py)
            blocked = logits.gather(1, tokens[:, None]).squeeze(1) == float("-inf")
            tokens = tokens.masked_fill(blocked, -1)
        return SamplerOutput(tokens, chosen, top_ids, top_lp)

    @staticmethod
    def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        scaled = logits / temperature[:, None]
        if batch.min_p is not None:
            probs = torch.softmax(scaled, dim=-1)
            floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        if batch.any_top_p_or_k:
            scaled = _apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
        probs = torch.softmax(scaled, dim=-1)
        exp_noise = -torch.log(uniform_noise(batch.seed, batch.step, logits.shape[-1]))
        return (probs / exp_noise).argmax(dim=-1)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf (keeps >= 1 token)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p == 1 mask nothing (float32 cumsums can exceed 1 in the tail).
    outside = (mass_before > top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
