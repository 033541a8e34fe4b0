"""The `strata` command: generate, chat, serve, bench, eval and env."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from strata.bench.http_throughput import add_url_args
from strata.bench.serve_cli import add_serve_args, cmd_bench_serve
from strata.bench.sim_cli import DESCRIPTION as SIM_DESCRIPTION
from strata.bench.sim_cli import add_sim_args, cmd_bench_sim
from strata.bench.throughput import add_throughput_args
from strata.bench.tiers_cli import DESCRIPTION as TIERS_DESCRIPTION
from strata.bench.tiers_cli import add_tiers_args, cmd_bench_tiers
from strata.commands import Command, add_commands
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.engine_flags import add_engine_args, engine_keywords
from strata.errors import StrataError
from strata.eval.cli import EVAL
from strata.flags import add_flags, keywords_from_args
from strata.options import build, flatten
from strata.server.config import ServeConfig

if TYPE_CHECKING:
    from strata.engine.front import EngineFront

SERVE_OPTIONS = flatten(ServeConfig)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"tokens to generate (default {max_tokens})",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely; -1 = off")
    g.add_argument("--request-seed", type=int, default=None, help="seed of the request's sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument(
        "--logprobs", type=int, default=None, metavar="N",
        help="print the N most likely tokens' log-probabilities at each step",
    )  # fmt: skip


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.request_seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def llm_from_args(args: argparse.Namespace) -> LLM:
    return LLM(**engine_keywords(args))


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    if any(not p.strip() for p in args.prompt):
        raise ValueError("a prompt is empty; give at least one non-blank prompt text")
    llm = llm_from_args(args)
    use_template = not args.no_chat_template and getattr(llm.get_tokenizer(), "chat_template", None)
    prompts = [
        llm.chat_prompt_ids([{"role": "user", "content": p}]) if use_template else p
        for p in args.prompt
    ]
    outs = llm.generate(prompts, params)
    tokenizer = llm.get_tokenizer()
    for out in outs:
        if len(outs) > 1:
            print(f"--- {out.request_id} ({out.finish_reason})")
        print(out.text)
        for lp in out.logprobs or []:
            top = ", ".join(f"{_tok(tokenizer, t)!r}: {v:.3f}" for t, v in lp.top)
            print(f"  {_tok(tokenizer, lp.token_id)!r} {lp.logprob:.3f}  [{top}]")
    return 0


def _tok(tokenizer: object, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id])  # type: ignore[attr-defined]


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    llm = llm_from_args(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset clears the conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        reply = ""
        try:
            for out in llm.stream(llm.chat_prompt_ids(history), params):
                print(out.delta_text, end="", flush=True)
                reply = out.text
        except StrataError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    from strata.models.loader import model_name
    from strata.server.serve import serve

    config = build(ServeConfig, keywords_from_args(args, SERVE_OPTIONS))
    env_key = os.environ.get("STRATA_API_KEY")
    config = replace(config, api_key=config.api_key or ((env_key,) if env_key else None))
    kwargs = engine_keywords(args)
    name = config.served_model_name or model_name(args.model)
    if config.num_replicas is not None:
        from strata.server.replicas.serve import serve_replicas

        return serve_replicas(kwargs, name, config, args.log_level)
    if config.api_server_count > 1:
        from strata.config import EngineConfig
        from strata.server.api_fronts import serve_fronts

        return serve_fronts(build(EngineConfig, kwargs), name, config, args.log_level)
    return serve(_engine_front(kwargs, config, args.log_level), name, config, args.log_level)


def _engine_front(kwargs: dict[str, Any], config: ServeConfig, log_level: str) -> EngineFront:
    """The engine `strata serve` serves: in its own process unless --engine-in-process."""
    from strata.config import EngineConfig
    from strata.engine.async_engine import AsyncEngine
    from strata.engine.core.client import ProcessEngine

    waiting = config.max_waiting_requests
    if config.engine_in_process:
        return AsyncEngine(lambda: LLM(**kwargs).engine, waiting)
    return ProcessEngine(
        build(EngineConfig, kwargs), waiting, logging.getLevelName(log_level.upper())
    )


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from strata.bench.moe import run

    run(args)
    return 0


def add_bench_moe_args(p: argparse.ArgumentParser) -> None:
    from strata.bench.moe import add_args

    add_args(p)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from strata.bench.throughput import run

    run(args)
    return 0


def add_env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-remote", default=os.environ.get("STRATA_KV_REMOTE", "redis://127.0.0.1:6379"),
        help="the Valkey/Redis URL to look for (default: $STRATA_KV_REMOTE, else "
        "redis://127.0.0.1:6379)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from strata.env_report import gather, render

    facts = gather(args.kv_remote)
    if args.json:
        print(json.dumps({f.name: f.value for f in facts}, indent=2))
    else:
        print(render(facts))
    return 0


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument(
        "--no-chat-template", action="store_true",
        help="send the prompt as raw text (default: wrap it as a user message in the "
        "model's chat template, when it has one)",
    )  # fmt: skip
    add_engine_args(p)
    add_sampling_args(p, max_tokens=256)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)


def add_serve_command_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, SERVE_OPTIONS)
    add_engine_args(p)


BENCH = Command("bench", "benchmarks", subcommands=(
    Command(
        "throughput",
        "offline throughput on random prompts (optionally against HF transformers)",
        (add_throughput_args, add_engine_args, add_url_args), cmd_bench_throughput,
    ),
    Command(
        "moe",
        "MoE expert offloading: decode tok/s at 25/50/100%% of experts resident, against "
        "the link-bandwidth bound and a naive copy-on-demand baseline",
        (add_bench_moe_args,), cmd_bench_moe,
    ),
    Command(
        "serve",
        "load test of a running OpenAI-compatible server (Strata, vLLM): streaming "
        "requests at Poisson or bursty arrival rates; TTFT, TPOT, ITL, throughput, goodput",
        (add_serve_args,), cmd_bench_serve,
    ),
    Command(
        "tiers",
        "KV tiers: TTFT of long-document QA with the context recomputed or loaded from "
        "the GPU pool, cpu, disk or remote tier, and multi-round chat with tiers off/on",
        (add_tiers_args,), cmd_bench_tiers, description=TIERS_DESCRIPTION,
    ),
    Command(
        "sim",
        "trace-driven simulation of many replicas: routers and prefill/decode ratios at "
        "8, 64, 512 replicas, with step costs fitted from a real replica",
        (add_sim_args,), cmd_bench_sim, description=SIM_DESCRIPTION,
    ),
))  # fmt: skip

COMMANDS = (
    Command("generate", "complete prompts and print the results", (add_generate_args,),
            cmd_generate),
    Command("chat", "interactive chat that streams the reply", (add_chat_args,), cmd_chat),
    Command(
        "serve",
        "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics)",
        (add_serve_command_args,), cmd_serve,
    ),
    BENCH,
    EVAL,
    Command(
        "env",
        "print what a bug report needs: versions of Strata, Python, torch, transformers, "
        "triton and CUDA, the device and its memory, a Valkey/Redis server, the lock",
        (add_env_args,), cmd_env,
    ),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Strata: LLM inference for models whose working memory does not fit "
        "on the GPU.",
    )
    add_commands(parser.add_subparsers(dest="command", required=True), COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (StrataError, ValueError) as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
