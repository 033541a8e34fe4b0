"""Expected Attention (kvpress's ExpectedAttentionPress): tokens scored by the attention
that future queries are expected to give them.

Future queries are modelled as Gaussian: per query head, the mean mu and covariance S of
the context's queries before RoPE (all but the first NUM_SINKS tokens), rotated by the
RoPE rotation averaged over the next FUTURE positions, R = mean_t R(C + t):
mu' = R mu, S' = R S R^T. For q ~ N(mu', S'), E[exp(q.k s)] = exp(mu'.k s + k^T S' k s^2 / 2)
(s = 1/sqrt(head_dim)), so each key's expected attention is

    softmax over the context's keys of  mu'.k s + k^T S' k s^2 / 2

averaged over a KV head's query heads and multiplied by the value's norm |v|. The sinks
are always kept. Compresses once, at the compression point.

Queries arrive after RoPE; they are rotated back with the model's own frequencies
(`ModelAccess.rope`), so the statistics are those of the pre-RoPE queries kvpress
computes from the hidden states.
"""

from __future__ import annotations

import torch

from strata.kv.policies.base import KVView
from strata.kv.policies.model_access import ModelAccess
from strata.kv.policies.observation import LayerObservation
from strata.kv.policies.rank_share import RankShare
from strata.kv.policies.scored import ScoredPolicy
from strata.ops.rotate_half import rotate_half


def mean_rotation(model: ModelAccess, first: int, count: int, dim: int) -> torch.Tensor:
    """[dim, dim] float64: the RoPE rotation averaged over positions [first, first + count)."""
    cos, sin = model.rope(torch.arange(first, first + count))
    eye = torch.eye(dim, dtype=torch.float64)
    half_turn = rotate_half(eye).T  # P with P x = rotate_half(x)
    rotations = cos.double()[:, :, None] * eye + sin.double()[:, :, None] * half_turn
    return rotations.mean(dim=0)


class ExpectedAttentionPolicy(ScoredPolicy):
    name = "expected_attention"
    NUM_SINKS = 4
    FUTURE = 512

    def reset(self) -> None:
        super().reset()
        layers = self.shape.num_layers
        self.query_sum: list[torch.Tensor | None] = [None] * layers  # [heads, d] float64
        self.query_outer: list[torch.Tensor | None] = [None] * layers  # [heads, d, d]
        self.query_count = [0] * layers
        self.context_len = 0

    def first_observed_token(self, context_len: int) -> int:
        return min(self.NUM_SINKS, context_len)

    def observed_queries(self, view: KVView, start: int, end: int) -> tuple[int, int] | None:
        self.context_len = view.context_len
        first, last = max(start, self.NUM_SINKS), min(end, view.context_len)
        return (first, last) if first < last else None

    def rank_share(self, view: KVView, start: int, end: int) -> RankShare:
        """Every head's queries, for the statistics; with the keys and values too when
        the context's last query is among them (expected_scores)."""
        return RankShare.QUERIES_KV if end >= view.context_len else RankShare.QUERIES

    def observe(self, obs: LayerObservation) -> None:
        if self.model is None:
            raise RuntimeError("expected_attention needs the model's RoPE: bind() was not called")
        cos, sin = self.model.rope(obs.query_slots)  # slots are positions before compressing
        q = obs.queries.float()
        # RoPE rotates and scales by s (cos^2 + sin^2 = s^2): undo both
        unrotated = q * cos[:, None] - rotate_half(q) * sin[:, None]
        q_pre = (unrotated / (cos[:, :1] ** 2 + sin[:, :1] ** 2)[:, None]).double()
        layer = obs.layer
        total = q_pre.sum(dim=0)
        outer = torch.einsum("mhi,mhj->hij", q_pre, q_pre)
        prev_sum, prev_outer = self.query_sum[layer], self.query_outer[layer]
        self.query_sum[layer] = total if prev_sum is None else prev_sum + total
        self.query_outer[layer] = outer if prev_outer is None else prev_outer + outer
        self.query_count[layer] += q_pre.shape[0]
        if int(obs.query_slots[-1]) + 1 == self.context_len:  # the context's last query
            self.scores.set(layer, self.expected_scores(obs))

    def expected_scores(self, obs: LayerObservation) -> torch.Tensor:
        """[kv_heads, C] for the layer of `obs`, whose cache is the whole context."""
        assert self.model is not None
        layer, n = obs.layer, obs.num_slots
        count = self.query_count[layer]
        query_sum, query_outer = self.query_sum[layer], self.query_outer[layer]
        assert query_sum is not None and query_outer is not None
        mean = query_sum / count
        cov = query_outer / count - torch.einsum("hi,hj->hij", mean, mean)
        rotation = mean_rotation(self.model, n, self.FUTURE, mean.shape[-1]).to(mean.device)
        mean = mean @ rotation.T
        cov = rotation @ cov @ rotation.T
        sinks = min(self.NUM_SINKS, n)
        keys = obs.keys[sinks:].double()  # [n', kv_heads, d]
        kv_heads, group = self.shape.num_kv_heads, self.shape.group_size
        keys_per_head = keys.repeat_interleave(group, dim=1)  # [n', heads, d]
        s = obs.scale
        logits = torch.einsum("hd,nhd->hn", mean, keys_per_head) * s
        logits += torch.einsum("nhi,hij,nhj->hn", keys_per_head, cov, keys_per_head) * s * s / 2
        probs = torch.softmax(logits, dim=-1).view(kv_heads, group, -1).mean(dim=1)
        scores = probs * obs.values[sinks:].double().norm(dim=-1).T
        keep_sinks = torch.full((kv_heads, sinks), torch.inf, dtype=torch.float64)
        return torch.cat([keep_sinks.to(scores.device), scores], dim=-1).float()
