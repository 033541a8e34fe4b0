"""The recall store on the GPU: exact at full budget, mixed batches equal solo runs.

SmolLM2-135M shape with random weights in float32 on CUDA, Triton attention for the
ordinary rows and CUDA graphs on: every recall policy at a budget covering every block
gives full attention's greedy tokens; a batch mixing every recall policy (small budgets)
and full equals each request run alone; requests of one length
share a page (strata/kv/recall/page.py) and its rows decoding together equal each alone;
selecting decode steps replayed from CUDA graphs give the tokens of an eager engine,
and whole decode steps from one graph each give those of per-layer graphs, overlapped
or not; the working-set update, fetch, rebuilt-keys, page attention and block scores
kernels give their torch paths' tokens;
a request reusing another's prompt prefix from the store (shared prefixes) gives the
tokens it gives salted apart (computing everything itself); nothing leaks.

python benchmarks/gpu_recall_check.py [--only-batches]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from strata import LLM, SamplingParams
from strata.engine.engine import LLMEngine

sys.path.insert(0, str(Path(__file__).parent))
from recall_switches import switched

SELECTING = ("quest", "shadowkv", "clusterkv", "pqcache")  # policies that pick blocks


class Checks(list[tuple[str, bool]]):
    """The check rows, each printed as it is added: a run cut short still shows what
    passed before it stopped."""

    def append(self, row: tuple[str, bool]) -> None:
        print(f"{'PASS' if row[1] else 'FAIL'}  {row[0]}", flush=True)
        super().append(row)

    def __iadd__(self, rows: Iterable[tuple[str, bool]]) -> Checks:  # type: ignore[override]
        for row in rows:
            self.append(row)
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only-batches", action="store_true",
                        help="only the mixed batch and magicpig's budget rows, then the "
                        "leak checks (about a minute)")
    only_batches = parser.parse_args().only_batches
    llm = small_engine()
    g = torch.Generator().manual_seed(0)
    lengths = (1500, 900, 1200, 1300)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lengths]
    greedy = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 48}
    rows = Checks()
    if not only_batches:
        rows += full_budget_equals_full(prompts, greedy, llm)
    mixed = [
        SamplingParams(kv_policy="quest", kv_budget=256, **greedy),
        SamplingParams(**greedy),
        SamplingParams(kv_policy="full_offload", kv_budget=1, **greedy),
        SamplingParams(kv_policy="shadowkv", kv_budget=256, **greedy),
        SamplingParams(kv_policy="clusterkv", kv_budget=256, **greedy),
        SamplingParams(kv_policy="pqcache", kv_budget=256, **greedy),
        SamplingParams(kv_policy="magicpig", kv_budget=256, **greedy),
    ]
    rows += mixed_batch_equals_solo(prompts + prompts[:3], mixed, llm)
    rows.append(magicpig_past_budget_unchanged(prompts[2], greedy, llm))
    if not only_batches:
        rows += store_graph_and_kernel_checks(prompts, greedy, g, llm)
    llm.check_integrity()
    stats = llm.stats()
    rows.append(("no recall state left", stats["recall_sequences"] == 0))
    rows.append(("no pool block held", stats["kv_blocks_free"] == stats["kv_blocks_total"]))
    print(f"{torch.cuda.get_device_name()}; recall stats: "
          f"hit rate {stats['recall_working_set_hit_rate']:.2f}, "
          f"{stats['recall_bytes_fetched'] / 1e6:.0f} MB fetched")  # fmt: skip
    print(f"{sum(ok for _, ok in rows)} of {len(rows)} PASS")
    if not all(ok for _, ok in rows):
        raise SystemExit(1)


def store_graph_and_kernel_checks(
    prompts: list[list[int]], greedy: dict[str, Any], g: torch.Generator, llm: LLM
) -> list[tuple[str, bool]]:
    """The pinned store, graph replays against eager steps, pages, the overlap, shared
    prefixes, the kernels against torch and the prefetch (all but --only-batches)."""
    store = llm.engine.parts.recall.store
    rows = [("host store page-locked (strata/pinned.py)", store.data.is_pinned())]
    replays = llm.stats()["recall_graph_replays"] + llm.stats()["recall_step_graph_replays"]
    rows.append(("selecting steps replayed from graphs", replays > 0))
    rows += graphs_equal_eager(prompts, greedy, llm)
    same = [torch.randint(100, 40000, (1200,), generator=g).tolist() for _ in range(4)]
    rows += pages_equal_solo(same, greedy, llm)
    rows += [(f"one page: {name}", ok) for name, ok in graphs_equal_eager(same, greedy, llm)]
    rows += whole_steps_equal_layer_graphs(same, greedy, llm)
    rows += overlapped_equal_synchronous(same, greedy, llm)
    rows += shared_prefix_equals_alone(g, greedy, llm)
    rows += kernels_equal_torch(same, greedy, llm)
    rows += prefetch_equals_without(same, greedy, llm)
    return rows


def full_budget_equals_full(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """Every policy with a budget covering every block gives full attention's tokens."""
    full = [o.token_ids for o in llm.generate(prompts, SamplingParams(**greedy))]
    rows = []
    for policy in (*SELECTING, "magicpig", "full_offload"):
        params = SamplingParams(kv_policy=policy, kv_budget=10**6, **greedy)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        rows.append((f"{policy} at full budget == full", got == full))
    return rows


def magicpig_past_budget_unchanged(
    prompt: list[int], greedy: dict[str, Any], llm: LLM
) -> tuple[str, bool]:
    """The budget only says where magicpig starts sampling: every budget the prompt's
    middle outgrows gives the same tokens."""
    runs = [llm.generate([prompt], SamplingParams(kv_policy="magicpig", kv_budget=b,
                                                  **greedy))[0].token_ids
            for b in (512, 256, 128)]  # fmt: skip
    return ("magicpig at budgets 512, 256, 128: the same tokens", runs[0] == runs[1] == runs[2])


def mixed_batch_equals_solo(
    prompts: list[list[int]], mixed: list[SamplingParams], llm: LLM
) -> list[tuple[str, bool]]:
    """A batch mixing every policy gives each request's solo tokens, and twice the same.
    magicpig hashes keys and queries by the signs of projections, so a last-bit change
    in a key can move a token in or out of its sample. Where the device's matmuls give other
    last bits in a batch than alone (full attention's logprobs differ bitwise), magicpig
    is held to run-to-run equality only."""
    solo = [llm.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, mixed, strict=True)]
    batch = [o.token_ids for o in llm.generate(prompts, mixed)]
    again = [o.token_ids for o in llm.generate(prompts, mixed)]
    logprobs = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8, logprobs=1)
    alone = llm.generate([prompts[-1]], logprobs)[0].logprobs
    among = llm.generate(prompts, logprobs)[-1].logprobs
    invariant = alone == among
    print(f"INFO  full attention's logprobs in a batch {'==' if invariant else '!='} alone")
    differ = [sp.kv_policy or "full" for sp, x, y in zip(mixed, batch, solo, strict=True)
              if x != y and (invariant or sp.kv_policy != "magicpig")]  # fmt: skip
    return [
        (f"mixed batch == solo runs{f' (not: {differ})' if differ else ''}", not differ),
        ("mixed batch run twice: the same tokens", batch == again),
    ]


def pages_equal_solo(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """Prompts of one length share a page: decoding its rows together equals each alone."""
    rows = []
    for policy in SELECTING:
        params = SamplingParams(kv_policy=policy, kv_budget=256, **greedy)
        solo = [llm.generate([p], params)[0].token_ids for p in prompts]
        batch = [o.token_ids for o in llm.generate(prompts, params)]
        rows.append((f"{policy}: a page of {len(prompts)} rows == each alone", batch == solo))
    return rows


def shared_prefix_equals_alone(
    g: torch.Generator, greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """A document, then two questions: the second request reuses the first's published
    prompt blocks, and gives the tokens it gives under its own cache_salt (no reuse)."""
    document = torch.randint(100, 40000, (1400,), generator=g).tolist()
    first, second = (document + torch.randint(100, 40000, (n,), generator=g).tolist()
                     for n in (40, 70))  # fmt: skip
    rows = []
    for policy in ("quest", "shadowkv"):
        salted = {salt: SamplingParams(kv_policy=policy, kv_budget=256, cache_salt=salt, **greedy)
                  for salt in (f"alone:{policy}", policy)}  # fmt: skip
        alone = llm.generate([second], salted[f"alone:{policy}"])[0].token_ids
        llm.generate([first], salted[policy])
        before = llm.stats()["recall_prefix_blocks_reused"]
        shared = llm.generate([second], salted[policy])[0].token_ids
        reused = llm.stats()["recall_prefix_blocks_reused"] - before
        rows.append((f"{policy}: {reused} reused prompt blocks == alone", reused > 0 and
                     shared == alone))  # fmt: skip
    return rows


def whole_steps_equal_layer_graphs(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """One page of rows: whole decode steps from one graph each (step_graphs.py) against
    eager steps around the page's per-layer graphs, in the same engine."""
    rows = []
    for policy in SELECTING:
        params = SamplingParams(kv_policy=policy, kv_budget=256, **greedy)
        with switched("step_graphs", False):
            layered = [o.token_ids for o in llm.generate(prompts, params)]
        before = llm.stats()["recall_step_graph_replays"]
        with switched("step_graphs", True):
            whole = [o.token_ids for o in llm.generate(prompts, params)]
        replays = llm.stats()["recall_step_graph_replays"] - before
        rows.append((f"{policy}: {replays} whole steps from graphs == per-layer graphs",
                     replays > 0 and whole == layered))  # fmt: skip
    return rows


def overlapped_equal_synchronous(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """One page of rows ending at different lengths, whole-step graphs on: recall steps
    launched before the last step's tokens reach the host (LLMEngine.overlap_recall)
    against synchronous ones, in the same engine (overlap scheduling is on by default on
    CUDA)."""
    rows = []
    lengths = [greedy["max_tokens"] - 8 * i for i in range(len(prompts))]
    for policy in ("quest", "shadowkv"):
        params = [SamplingParams(kv_policy=policy, kv_budget=256, **{**greedy, "max_tokens": n})
                  for n in lengths]  # fmt: skip
        LLMEngine.overlap_recall = False
        synchronous = [o.token_ids for o in llm.generate(prompts, params)]
        LLMEngine.overlap_recall = True
        overlapped = [o.token_ids for o in llm.generate(prompts, params)]
        LLMEngine.overlap_recall = False
        mode = "on" if llm.engine.overlap else "off"
        name = f"{policy}: overlapped steps == synchronous (overlap {mode})"
        rows.append((name, overlapped == synchronous))
    return rows


def kernels_equal_torch(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """One page of rows: the working-set update and fetch kernels (integer work and
    copies: exact), shadowkv's rebuilt-keys kernel, the page attention and the block
    scores kernels (float32 sums in another order), each alone and all together, and the
    values fetched on a side stream, against their torch paths (or the one stream), in
    the same engine; each switch is left as it was."""
    rows = []
    for policy, arm in (("quest", "update_kernel"), ("shadowkv", "update_kernel"),
                        ("quest", "fetch_kernel"), ("shadowkv", "fetch_kernel"),
                        ("shadowkv", "rebuild_kernel"), ("quest", "recall_kernels"),
                        ("shadowkv", "recall_kernels"), ("quest", "attention_kernel"),
                        ("shadowkv", "attention_kernel"), ("quest", "scores_kernel"),
                        ("shadowkv", "scores_kernel"), ("quest", "fetch_stream"),
                        ("shadowkv", "fetch_stream")):  # fmt: skip
        params = SamplingParams(kv_policy=policy, kv_budget=256, **greedy)
        outputs = []
        for on in (False, True):
            with switched(arm, on):
                outputs.append([o.token_ids for o in llm.generate(prompts, params)])
        rows.append((f"{policy}: {arm} == torch path", outputs[1] == outputs[0]))
    return rows


def prefetch_equals_without(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """One page of rows, in a second engine with the cross-layer prefetch (its guesses
    fetched on their own stream a layer early, per-layer graphs, then whole steps from
    one graph): the tokens of the first engine, without it."""
    ahead = small_engine(kv_recall_prefetch=True)
    rows = []
    for policy, plain, guessed in both_engines(llm, ahead, prompts, greedy):
        precision = ahead.stats()["recall_prefetch_precision"]
        rows.append((f"{policy}: prefetch (precision {precision:.0%}) == without",
                     guessed == plain and precision > 0))  # fmt: skip
    ahead.check_integrity()
    return rows


def graphs_equal_eager(
    prompts: list[list[int]], greedy: dict[str, Any], llm: LLM
) -> list[tuple[str, bool]]:
    """The selecting policies at a small budget: CUDA-graph replays against an eager engine."""
    eager = small_engine(enforce_eager=True)
    rows = [(f"{policy}: graphs == eager", graphed == plain)
            for policy, graphed, plain in both_engines(llm, eager, prompts, greedy)]  # fmt: skip
    eager.check_integrity()
    return rows


def small_engine(**options: Any) -> LLM:
    """The SmolLM2-135M shape in float32 with a small pool and recall store."""
    return LLM(
        "random:smollm2-135m", dtype="float32", kv_cache_memory=2.0,
        kv_recall_host_memory=2.0, kv_recall_gpu_memory=1.0, max_num_batched_tokens=512,
        **options,
    )  # fmt: skip


def both_engines(
    llm: LLM, other: LLM, prompts: list[list[int]], greedy: dict[str, Any]
) -> list[tuple[str, list[list[int]], list[list[int]]]]:
    """Per selecting policy (at a budget of 256): each engine's tokens."""
    runs = []
    for policy in SELECTING:
        params = SamplingParams(kv_policy=policy, kv_budget=256, **greedy)
        runs.append((policy, [o.token_ids for o in llm.generate(prompts, params)],
                     [o.token_ids for o in other.generate(prompts, params)]))  # fmt: skip
    return runs


if __name__ == "__main__":
    main()
