"""magicpig's host work for one sparse layer of one sequence, by part (issue 17): finding
the sampled tokens (one call, then KV heads side by side on worker threads), gathering
their keys and values from a host store, and attending them on the host.

    PYTHONPATH=. python benchmarks/magicpig_host_part.py [--tokens 131072] [--json F]

Llama-3-8B's attention shape by default (32 query heads, 8 KV heads, head_dim 128), the
engine's K=10 x L=150 tables over keys that lean one way per head (a shared direction
plus noise, as real keys do: about 2k samples a query head at 128k). Median of --repeats
after one untimed call.
Since the device reads the sampled rows from the pinned store in place, the host's part
of a step that attends on the device is the candidates alone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from strata.kv.recall import sampled_attention
from strata.kv.recall.lsh import HashTables, hash_codes, projection
from strata.kv.recall.magicpig import BITS, TABLES
from strata.timing import median_seconds


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds: the median of `repeats` timed calls after one untimed."""
    return 1e3 * median_seconds(fn, lambda: None, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072, help="middle tokens in the tables")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per part (median)")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args()
    torch.manual_seed(0)
    kvh, group, d, n = a.kv_heads, a.heads // a.kv_heads, a.head_dim, a.tokens
    proj = projection(d, BITS, TABLES, None)
    keys = torch.randn(kvh, n, d) + 2.0 * torch.randn(kvh, 1, d)
    mean = keys.mean(1, keepdim=True)
    codes = torch.cat([hash_codes(chunk - mean, proj, BITS)
                       for chunk in tqdm(keys.split(8192, dim=1), desc="hashing keys")], dim=1)
    tables = HashTables(codes, BITS)
    kv = torch.arange(a.heads) // group
    q = keys[kv, torch.randint(0, n, (a.heads,))] + 0.5 * torch.randn(a.heads, d)
    q_codes = hash_codes(q - mean[kv, 0], proj, BITS)
    found = tables.candidates(q_codes, group)
    store = torch.randn(2, kvh * n, d).to(torch.bfloat16)
    rows = (found.heads // group) * n + found.tokens
    results = {
        "tokens": n, "heads": a.heads, "kv_heads": kvh, "head_dim": d,
        "torch_threads": torch.get_num_threads(),
        "candidate_workers": sampled_attention.CANDIDATE_WORKERS,
        "pairs_per_head": found.tokens.numel() / a.heads,
        "candidates_one_call_ms": median_ms(lambda: tables.candidates(q_codes, group),
                                            a.repeats),
        "candidates_on_threads_ms": median_ms(
            lambda: sampled_attention._candidates(tables, q_codes, group), a.repeats),
        "host_gather_ms": median_ms(lambda: (store[0][rows], store[1][rows]), a.repeats),
        "host_attention_ms": median_ms(lambda: sampled_attention.sampled_part(
            q, found.heads, store[0][rows], store[1][rows], mean[:, 0], group, d**-0.5,
            BITS, TABLES), a.repeats),
    }  # fmt: skip
    for name, value in results.items():
        print(f"{name:28s} {value:.2f}" if isinstance(value, float) else f"{name:28s} {value}")
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
