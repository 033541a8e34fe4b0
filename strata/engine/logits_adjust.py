"""LogitsAdjustment: a step's penalties, biases and bans, applied to all rows at once.

Built on the host from the sampling rows' LogitRules (logit_rules.py), uploaded as a few
small index tensors, and applied on the device before temperature, in vLLM's order:

    repetition   seen in prompt or output:  l > 0 ? l / r : l * r
    frequency    l -= f * count in output
    presence     l -= p * (count in output > 0)
    logit_bias   l += bias
    bans         l = -inf   (stop tokens before min_tokens, bad words' last tokens)

Every row's result depends only on that row's logits, tokens and rules, so a request
gets the same logits whatever batch it runs in. Token-id lists are padded with -1; the
padding scatters into a spare column that is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strata.engine.sequence import Sequence


@dataclass(frozen=True)
class PenaltyBatch:
    """The penalized rows' penalties and tokens, [m] and [m, tokens]."""

    rows: torch.Tensor  # int64 indices into the step's sampling rows
    presence: torch.Tensor  # float32
    frequency: torch.Tensor
    repetition: torch.Tensor
    output_ids: torch.Tensor  # int64, -1 padded
    prompt_ids: torch.Tensor  # int64, -1 padded; empty for rows without repetition

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[1]
        sub = logits[self.rows]
        counts = _scatter_counts(self.output_ids, vocab)
        seen = _scatter_counts(self.prompt_ids, vocab) + counts > 0
        rep = self.repetition[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - self.frequency[:, None] * counts
        sub = sub - self.presence[:, None] * (counts > 0).to(sub.dtype)
        return logits.index_put((self.rows,), sub)


def _scatter_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[m, vocab] float32 counts of each id per row (-1 padding ignored)."""
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    index = torch.where(ids < 0, vocab, ids)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab]


@dataclass(frozen=True)
class LogitsAdjustment:
    penalties: PenaltyBatch | None
    bias_at: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids), int64 [k]
    bias: torch.Tensor | None  # float32 [k]
    banned_at: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids), int64 [b]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [rows, vocab] float32 -> adjusted copy (the input is not changed)."""
        if self.penalties is not None:
            logits = self.penalties.apply(logits)
        if self.bias_at is not None and self.bias is not None:
            logits = logits.index_put(self.bias_at, self.bias, accumulate=True)
        if self.banned_at is not None:
            logits = logits.index_put(self.banned_at, logits.new_tensor(float("-inf")))
        return logits


def build_adjustment(seqs: list[Sequence], device: torch.device) -> LogitsAdjustment | None:
    """The adjustment for sampling rows `seqs` (row i is seqs[i]); None if no row has one."""
    if all(s.logit_rules is None for s in seqs):
        return None
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for row, seq in enumerate(seqs):
        rules = seq.logit_rules
        if rules is None:
            continue
        bias_rows.extend([row] * len(rules.bias))
        bias_ids.extend(t for t, _ in rules.bias)
        bias.extend(b for _, b in rules.bias)
        banned = rules.banned(seq.output_token_ids)
        ban_rows.extend([row] * len(banned))
        ban_ids.extend(banned)

    def pairs(rows: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not rows:
            return None
        both = _upload(np.array([rows, ids], dtype=np.int64), device)
        return both[0], both[1]

    return LogitsAdjustment(
        penalties=_penalty_batch(seqs, device),
        bias_at=pairs(bias_rows, bias_ids),
        bias=_upload(np.array(bias, dtype=np.float32), device) if bias else None,
        banned_at=pairs(ban_rows, ban_ids),
    )


def _penalty_batch(seqs: list[Sequence], device: torch.device) -> PenaltyBatch | None:
    rows = [i for i, s in enumerate(seqs) if s.logit_rules is not None and s.logit_rules.penalized]
    if not rows:
        return None
    rules = [seqs[i].logit_rules for i in rows]
    values = np.array(
        [[r.presence, r.frequency, r.repetition] for r in rules if r is not None], np.float32
    )
    outputs = [seqs[i].output_token_ids for i in rows]
    prompts = [
        seqs[i].prompt_token_ids if r is not None and r.repetition != 1.0 else []
        for i, r in zip(rows, rules, strict=True)
    ]
    floats = _upload(values.T.copy(), device)
    return PenaltyBatch(
        rows=_upload(np.array(rows, dtype=np.int64), device),
        presence=floats[0],
        frequency=floats[1],
        repetition=floats[2],
        output_ids=_upload(_padded(outputs), device),
        prompt_ids=_upload(_padded(prompts), device),
    )


def _padded(lists: list[list[int]]) -> np.ndarray:
    out = np.full((len(lists), max((len(x) for x in lists), default=0)), -1, dtype=np.int64)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = ids
    return out


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device, non_blocking=True)
