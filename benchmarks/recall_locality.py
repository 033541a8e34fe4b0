"""How much of a recall policy's selection repeats from one decode step to the next on a
real model: the working-set hit rate and the bytes fetched per token.

Random weights (the GPU speed runs) select nearly afresh every step, so each token
fetches most of its budget from the host. This runs the embedded model (real weights)
over real text: the first --context tokens of this repository's docs, then a request to
summarise them, decoding --tokens greedy tokens per policy and budget.

python benchmarks/recall_locality.py [--context 4096] [--tokens 64] [--budgets 0.0625,0.125]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from strata import LLM, SamplingParams

DOCS = Path(__file__).resolve().parent.parent / "docs"


def prompt_ids(llm: LLM, context: int, kind: str = "docs") -> list[int]:
    """docs: this repository's docs, then a request to summarise them; random: token ids
    drawn uniformly from [1000, min(vocab, 100000)), as the GPU speed runs' prompts."""
    if kind == "random":
        vocab = llm.engine.model_config.vocab_size
        g = torch.Generator().manual_seed(0)
        return torch.randint(1000, min(vocab, 100000), (context,), generator=g).tolist()
    tokenizer = llm.engine.tokenizer
    assert tokenizer is not None
    text = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    ids = tokenizer.encode(text)[:context]
    ask = tokenizer.encode("\n\nSummarise the text above in three sentences:\n")
    return ids + ask


def decode_locality(llm: LLM, ids: list[int], params: SamplingParams) -> dict[str, float]:
    """The decode steps' hit rate and bytes fetched per token, from the first token on
    (the prompt's prefill streams every middle block and is left out)."""
    engine = llm.engine
    request_id = engine.add_request(ids, params)
    seq = engine._seqs[request_id]
    while seq.num_output_tokens == 0:
        engine.step()
    before, start = llm.stats(), time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    after = llm.stats()
    delta = {k: after[k] - before[k] for k in (
        "recall_working_set_hits", "recall_working_set_misses", "recall_bytes_fetched",
        "recall_decode_steps", "recall_prefetch_bytes",
    )}  # fmt: skip
    picked = delta["recall_working_set_hits"] + delta["recall_working_set_misses"]
    steps = delta["recall_decode_steps"]
    return {
        "decode_steps": steps,
        "hit_rate": delta["recall_working_set_hits"] / max(1, picked),
        "fetched_bytes_per_token": delta["recall_bytes_fetched"] / max(1, steps),
        "prefetched_bytes_per_token": delta["recall_prefetch_bytes"] / max(1, steps),
        # the whole run's (the prompt's prefill guesses nothing: decode steps only)
        "prefetch_precision": after["recall_prefetch_precision"],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096, help="tokens of docs text")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per run")
    p.add_argument("--budgets", default="0.0625,0.125", help="kv_budget values (fractions)")
    p.add_argument("--policies", default="quest,shadowkv", help="recall policies")
    p.add_argument("--model", default=None,
                   help="default: the embedded model; e.g. random:smollm2-135m for its shape "
                        "with random weights (the tokenizer is the embedded model's)")
    p.add_argument("--prompt", choices=("docs", "random"), default="docs",
                   help="docs: real text; random: uniform random token ids (the speed runs')")
    p.add_argument("--working-set-factor", type=int, default=1,
                   help="kv_recall_working_set_factor: working-set slots per picked block")
    p.add_argument("--prefetch", action="store_true",
                   help="kv_recall_prefetch: each sparse layer's picks guessed and fetched "
                        "a layer early (the hit rate then counts the guesses' blocks)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args()

    def engine() -> LLM:  # one per run: the prefetch's precision is the engine's whole run's
        return LLM(a.model, device=a.device, dtype="float32" if a.device == "cpu" else "auto",
                   kv_recall_host_memory=2.0, max_model_len=a.context + a.tokens + 64,
                   kv_recall_working_set_factor=a.working_set_factor,
                   kv_recall_prefetch=a.prefetch)  # fmt: skip

    llm = engine()
    ids = prompt_ids(llm, a.context, a.prompt)
    runs = [(pol, float(b)) for pol in a.policies.split(",") for b in a.budgets.split(",")]
    rows = []
    for i, (policy, budget) in enumerate(tqdm(runs, desc="recall runs")):
        params = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True,
                                kv_policy=policy, kv_budget=budget)  # fmt: skip
        llm = llm if i == 0 or not a.prefetch else engine()
        rows.append({"policy": policy, "budget": budget, **decode_locality(llm, ids, params)})
    print(f"{len(ids)} prompt tokens, {a.tokens} decode steps each")
    print("| policy | budget | working-set hit rate | fetched per decode token | prefetched "
          "per decode token | prefetch precision |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['budget']} | {r['hit_rate']:.1%} | "
              f"{r['fetched_bytes_per_token'] / 1e6:.3f} MB | "
              f"{r['prefetched_bytes_per_token'] / 1e6:.3f} MB | "
              f"{r['prefetch_precision']:.1%} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
