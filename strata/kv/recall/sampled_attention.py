"""A sampling policy's decode of one sparse layer (magicpig.py): the middle's sampled keys
attended on the host, the rest on the device, merged by log-sum-exp.

    device  q's codes (hashed), copied to the host with q; then, while the host works,
            attention over the sink and the tail: out_l, lse_l
    host    (a worker thread) the middle tokens colliding with each query head in at
            least two tables (KV heads' query heads side by side on CANDIDATE_WORKERS
            threads); their keys and values from the host store; attention over them,
            each key's logit less log(its sampling probability): out_s, lse_s
    merge   out = (out_l e^(lse_l - M) + out_s e^(lse_s - M)) / (e^(lse_l - M) + e^(lse_s - M))

When a layer decodes several sampling sequences, every one's host part is started
(`start_host_part`) before any waits for its own, so their host parts run side by side on
HOST_WORKERS threads while the device attends their sinks and tails.

A head that samples nothing has lse_s = -inf and keeps out_l. Where the cost model
(host_attention_cost.py) finds moving the sampled rows to the device cheaper than
attending them on the host, the host only names their store rows: the device reads them
from the pinned store in place (rows.py) and attends.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from strata.kv.recall.geometry import SINK_BLOCKS
from strata.kv.recall.host_attention_cost import host_attention_cost
from strata.kv.recall.lsh import Candidates, HashTables, sampling_probability
from strata.kv.recall.rows import copy_rows

if TYPE_CHECKING:
    from strata.kv.recall.magicpig import MagicPIGPolicy
    from strata.kv.recall.sequence import RecallSequence

HOST_WORKERS = min(4, os.cpu_count() or 1)  # sequences' host parts side by side
_HOST = ThreadPoolExecutor(max_workers=HOST_WORKERS, thread_name_prefix="strata-sampled-attention")
CANDIDATE_WORKERS = min(8, os.cpu_count() or 1)
# torch's CPU ops let go of the GIL: KV heads' candidates are found side by side
_CANDIDATES = ThreadPoolExecutor(max_workers=CANDIDATE_WORKERS,
                                 thread_name_prefix="strata-lsh-candidates")  # fmt: skip


def attention_lse(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, D] over keys, values [KVH, n, D] (n >= 1): out [H, D], lse [H], float32."""
    kvh, _, d = keys.shape
    grouped = q.float().view(kvh, -1, d)
    logits = grouped @ keys.float().transpose(-1, -2) * scale  # [KVH, G, n]
    lse = logits.logsumexp(dim=-1)
    out = (logits - lse[..., None]).exp() @ values.float()
    return out.reshape(-1, d), lse.flatten()


def sampled_part(
    q: torch.Tensor, heads: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    mean: torch.Tensor, group: int, scale: float, bits: int, tables: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention of queries q [H, D] over sampled keys, values [N, D] (sample i belongs to
    query head heads[i], heads on the host, ascending), each logit less log of its
    sampling probability, whose cosine is taken to the key centred on its KV head's mean
    [KVH, D]: out [H, D], lse [H] float32 (-inf, with out 0, for a head with no sample).
    The samples are laid out per head, padded to the most any head has, so every sum runs
    in one order: the same result whatever else runs (no atomic adds)."""
    num_heads, dim = q.shape
    counts = torch.bincount(heads, minlength=num_heads)
    width = max(1, int(counts.max())) if heads.numel() else 1
    starts = counts.cumsum(0) - counts
    places = (heads * width + torch.arange(heads.numel()) - starts[heads]).to(q.device)
    padded = torch.zeros(2, num_heads * width, dim, device=q.device)
    padded[0].index_copy_(0, places, keys.float())
    padded[1].index_copy_(0, places, values.float())
    valid = torch.zeros(num_heads * width, dtype=torch.bool, device=q.device)
    valid = valid.index_fill_(0, places, True).view(num_heads, width)
    k, v = padded.view(2, num_heads, width, dim).unbind(0)
    qf = q.float()
    centre = mean.float().repeat_interleave(group, dim=0)  # [H, D]: each head's KV mean
    qk = torch.bmm(k, qf[:, :, None])[..., 0]  # [H, W]
    kc = torch.bmm(k, centre[:, :, None])[..., 0]
    # q . (k - c) and |k - c|, from q.k, k.c, |k|^2 and c: no centred copy of the keys
    q_centred = qk - (qf * centre).sum(-1, keepdim=True)
    norm2 = (k * k).sum(-1) - 2 * kc + (centre * centre).sum(-1, keepdim=True)
    scale_cos = qf.norm(dim=-1, keepdim=True) * norm2.clamp(min=0).sqrt()
    cos = q_centred / scale_cos.clamp(min=1e-30)
    logits = qk * scale - sampling_probability(cos, bits, tables).log()
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = logits.logsumexp(dim=-1)  # -inf where a head has no sample
    weights = torch.where(valid, (logits - lse[:, None]).exp(), 0.0)
    return torch.bmm(weights[:, None, :], v)[:, 0], lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over two disjoint key sets from each one's out [H, D] and lse [H]; lse_a
    is finite (the device part always has keys)."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = (lse_a - top).exp(), (lse_b - top).exp()
    return (out_a * wa[:, None] + out_b * wb[:, None]) / (wa + wb)[:, None]


@dataclass
class SampledCounters:
    """A sequence's sampled decode so far: (query head, key) pairs sampled; sparse layers
    whose samples were attended on the host, or on the device; the seconds the host
    worker took (from the query on the host on) and those the engine thread waited. And
    the host part started ahead for one sparse layer (start_host_part), if any."""

    keys: int = 0
    on_host: int = 0
    on_device: int = 0
    host_seconds: float = 0.0
    wait_seconds: float = 0.0
    ahead: tuple[tuple[int, int], Future[Gathered]] | None = None  # (layer, token), its part


@dataclass(frozen=True)
class Gathered:
    """The host's part of a layer: attended there (out, lse), or gathered for the device."""

    pairs: int  # sampled (query head, key) pairs
    seconds: float  # the worker's time on it
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # [2, pairs] flat store rows of keys, values


def sampled_decode(
    seq: RecallSequence, s: int, q: torch.Tensor, local_k: torch.Tensor,
    local_v: torch.Tensor, m: int, scale: float, token: int,
) -> torch.Tensor:  # fmt: skip
    """q [1, H, D] of sparse layer s for the token at position `token` over the sink and
    tail (local_k, local_v [KVH, n, D]) and a sample of the m middle blocks; [1, H, D] in
    q's dtype."""
    policy: MagicPIGPolicy = seq.policy  # type: ignore[assignment]
    if policy.wants_all_keys(s):
        seq.give_all_keys(s, m)
    qs = q[0]
    ahead, seq.sampled.ahead = seq.sampled.ahead, None
    if ahead is not None and ahead[0] == (s, token):
        host = ahead[1]
    else:  # none started for this layer and token
        host = _submit(seq, s, qs, m, scale)
    out_l, lse_l = attention_lse(qs, local_k, local_v, scale)  # the device works meanwhile
    waited = time.perf_counter()
    part = host.result()
    counts = seq.sampled
    counts.wait_seconds += time.perf_counter() - waited
    counts.host_seconds += part.seconds
    counts.keys += part.pairs
    if part.out is not None and part.lse is not None:
        counts.on_host += 1
        out_s, lse_s = part.out.to(q.device), part.lse.to(q.device)
    else:
        assert part.heads is not None and part.rows is not None
        counts.on_device += 1
        g = seq.geometry
        keys, values = _rows_on_device(seq.store.data.view(-1, g.head_dim), part.rows, q.device)
        out_s, lse_s = sampled_part(
            qs, part.heads, keys, values, policy.mean[s], g.group_size, scale, policy.bits,
            policy.num_tables,
        )  # fmt: skip
    return merge(out_l, lse_l, out_s, lse_s)[None].to(q.dtype)


def start_host_part(
    seq: RecallSequence, s: int, q: torch.Tensor, m: int, scale: float, token: int
) -> bool:
    """Start the host part of sparse layer s's coming sampled_decode for the token at
    `token` (q [1, H, D], m middle blocks), so that it runs beside other sequences'.
    False, starting nothing, where the layer's policy first wants all its keys
    (sampled_decode gives them, then starts it)."""
    policy: MagicPIGPolicy = seq.policy  # type: ignore[assignment]
    if policy.wants_all_keys(s):
        return False
    seq.sampled.ahead = ((s, token), _submit(seq, s, q[0], m, scale))
    return True


def _submit(
    seq: RecallSequence, s: int, q: torch.Tensor, m: int, scale: float
) -> Future[Gathered]:
    """Hash q [H, D] on its device, copy it and its codes to the host, and submit the host
    part, which starts once they are there."""
    policy: MagicPIGPolicy = seq.policy  # type: ignore[assignment]
    codes = policy.query_codes(s, q)
    q_host, codes_host = q.float().to("cpu", non_blocking=True), codes.to("cpu", non_blocking=True)
    ready = torch.cuda.Event() if q.is_cuda else None
    if ready is not None:
        ready.record()
    return _HOST.submit(_host_part, seq, policy, s, q_host, codes_host, ready, m, scale)


def _rows_on_device(
    flat: torch.Tensor, rows: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [pairs, head_dim] of the store rows [2, pairs], on `device`, read
    from the (pinned) store in place on CUDA."""
    picked = rows.flatten().to(device, non_blocking=True)
    out = torch.empty(picked.numel(), flat.shape[1], dtype=flat.dtype, device=device)
    copy_rows(flat, out, picked, torch.arange(picked.numel(), device=device))
    keys, values = out.view(2, -1, flat.shape[1]).unbind(0)
    return keys, values


def _candidates(tables: HashTables, codes: torch.Tensor, group: int) -> Candidates:
    """tables.candidates of every query head, runs of whole KV heads on worker threads."""
    kv_heads = codes.shape[0] // group
    runs = min(CANDIDATE_WORKERS, kv_heads)
    if runs <= 1:
        return tables.candidates(codes, group)
    per_run = -(-kv_heads // runs) * group
    parts = list(_CANDIDATES.map(
        lambda first: tables.candidates(codes[first : first + per_run], group, first),
        range(0, codes.shape[0], per_run),
    ))  # fmt: skip
    return Candidates(torch.cat([c.heads for c in parts]), torch.cat([c.tokens for c in parts]))


def _host_part(
    seq: RecallSequence, policy: MagicPIGPolicy, s: int, q: torch.Tensor, codes: torch.Tensor,
    ready: torch.cuda.Event | None, m: int, scale: float,
) -> Gathered:  # fmt: skip
    """On a worker: sample layer s's middle for q [H, D] (codes [H, tables]), gather the
    samples' keys and values, and attend them here unless the device is cheaper."""
    start = time.perf_counter()
    if ready is not None:
        ready.synchronize()
    g, store = seq.geometry, seq.store
    bs, kvh, group = g.block_size, g.num_kv_heads, g.group_size
    found = _candidates(policy.tables_of(s), codes, group)
    inside = found.tokens < m * bs  # the tables hold no more than the middle; guard
    heads, tokens = found.heads[inside], found.tokens[inside]
    kv = heads // group
    slots = seq.slots_on_host[:, SINK_BLOCKS + tokens // bs]  # [2, N] key, value slots
    rows = ((s * store.num_slots + slots) * kvh + kv) * bs + tokens % bs
    flat = store.data.view(-1, g.head_dim)
    pairs = int(heads.numel())
    if host_attention_cost(seq.sink_k.device).on_host(flat.element_size() * g.head_dim):
        out, lse = sampled_part(q, heads, flat[rows[0]], flat[rows[1]], policy.mean_on_host(s),
                                group, scale, policy.bits, policy.num_tables)  # fmt: skip
        return Gathered(pairs, time.perf_counter() - start, out=out, lse=lse)
    return Gathered(pairs, time.perf_counter() - start, heads=heads, rows=rows)
