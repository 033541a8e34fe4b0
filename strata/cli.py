"""The `strata` command: generate, chat, serve, bench, eval and env."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from strata.bench.http_throughput import add_url_args
from strata.bench.serve_cli import add_serve_args, cmd_bench_serve
from strata.bench.tiers_cli import DESCRIPTION as TIERS_DESCRIPTION
from strata.bench.tiers_cli import add_tiers_args, cmd_bench_tiers
from strata.bench.workload import parse_range
from strata.config import MoEConfig
from strata.engine.llm import LLM
from strata.engine.sampling_params import SamplingParams
from strata.errors import StrataError
from strata.eval.cli import add_eval_parser
from strata.kv.policies.registry import policy_names


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model folder (config.json + safetensors), a .gguf file, "
        "random:PRESET (llama-3-8b, llama-3.2-1b, qwen2.5-7b, qwen2.5-0.5b, mistral-7b, "
        "smollm2-135m, olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, qwen1.5-moe-a2.7b) or "
        "random:CONFIG.json for random weights of that shape. "
        "Default: the embedded SmolLM2-135M-Instruct.",
    )
    g.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV dtype; auto = float32 on CPU, bfloat16 on CUDA",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="GiB for the KV block pool (default: 2 on CPU; on CUDA what is left of "
        "--gpu-memory-utilization after the weights and a warm-up)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.90,
        help="fraction of GPU memory Strata may use in all (default 0.90)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8", "int4", "int2"],
        help="KV block codec: auto = the model dtype; fp8 (e4m3, per-token scales) or "
        "int8/int4/int2 (KIVI: keys per channel, values per token) store complete blocks "
        "coded, so the same --kv-cache-memory holds more tokens; each sequence's open block "
        "stays in full precision",
    )  # fmt: skip
    g.add_argument(
        "--kv-policy", default="full", choices=policy_names(),
        help="KV eviction policy of requests that name none (default full: lossless); "
        "HTTP bodies and SamplingParams may choose their own",
    )  # fmt: skip
    g.add_argument(
        "--kv-budget", type=float, default=None, metavar="B",
        help="KV the policy keeps: a fraction of the context if < 1, tokens if >= 1",
    )  # fmt: skip
    g.add_argument(
        "--kv-evict-interval", type=int, default=None, metavar="N",
        help="decode steps between evictions of the policies that evict while decoding "
        "(streaming, h2o, tova, treekv): the cache grows to cap + N - 1 tokens, then evicts "
        "back to its cap (default: the block size, so each eviction frees a block; 1 = "
        "every step, as the papers define them)",
    )  # fmt: skip
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens computed per step, prefill chunks and decodes together (default 2048)",
    )
    g.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences running at once (default 256)"
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest sequence, prompt plus output (default: the model's context length)",
    )
    g.add_argument(
        "--no-prefix-caching", action="store_true", help="do not reuse KV blocks across requests"
    )
    g.add_argument(
        "--seed", type=int, default=0, help="engine seed (random weights, unseeded requests)"
    )
    g.add_argument(
        "--attention-backend", default="auto", choices=["auto", "reference", "triton"],
        help="attention kernels; auto = triton on CUDA when triton imports, else reference",
    )  # fmt: skip
    g.add_argument(
        "--no-cuda-graphs", action="store_true",
        help="run decode steps eagerly instead of replaying captured CUDA graphs",
    )  # fmt: skip
    add_tier_args(p)
    add_moe_args(p)
    g.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the engine's messages on stderr (default INFO)",
    )  # fmt: skip


def add_tier_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "KV tiers",
        "Full KV blocks are written through to these tiers as they are computed; a prefix "
        "found in any tier is loaded back instead of recomputed.",
    )
    g.add_argument(
        "--kv-cpu-memory", type=float, default=None, metavar="GIB",
        help="a CPU RAM tier of this many GiB (pinned on CUDA hosts); disk and remote tiers "
        "stage through it and add a 1 GiB one if it is not given",
    )  # fmt: skip
    g.add_argument(
        "--kv-disk-dir", default=None, metavar="PATH",
        help="a local disk tier in this directory; blocks survive restarts and are found "
        "again by any engine of the same model, dtype and block size",
    )  # fmt: skip
    g.add_argument(
        "--kv-disk-size", type=float, default=16.0, metavar="GIB",
        help="cap of the disk tier in GiB (default 16); the least recently used blocks go first",
    )  # fmt: skip
    g.add_argument(
        "--kv-remote", default=None, metavar="URL",
        help="a remote tier on a Valkey or Redis server (valkey://host:port or "
        "redis://host:port), shared by every engine that points at it; its size is the "
        "server's maxmemory",
    )  # fmt: skip
    g.add_argument(
        "--kv-remote-timeout", type=float, default=0.5, metavar="S",
        help="seconds before a remote call counts as failed (the block is recomputed and the "
        "tier retried later; default 0.5)",
    )  # fmt: skip
    g.add_argument(
        "--kv-tier-eviction", default="lru", choices=["lru", "fifo"],
        help="eviction order inside each tier (default lru)",
    )  # fmt: skip
    g.add_argument(
        "--preemption-mode", default="auto", choices=["recompute", "swap", "auto"],
        help="when the GPU pool runs out: recompute the preempted sequence later, swap (keep "
        "its blocks pinned in the CPU tier), or auto: swap when reloading is estimated to be "
        "cheaper (needs a tier; default auto)",
    )  # fmt: skip
    g.add_argument(
        "--session-gpu-fraction", type=float, default=0.25, metavar="F",
        help="share of the GPU pool that session pins (session_id + cache_ttl_s) may hold; "
        "beyond it pins go to the CPU tier (default 0.25)",
    )  # fmt: skip


def add_moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE expert offloading (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE)")
    g.add_argument(
        "--gpu-memory", type=float, default=None, metavar="GIB",
        help="GiB of GPU memory for weights, activations, KV blocks and expert slots; turns "
        "expert offloading on: routed experts live in pinned CPU memory, a GPU expert cache "
        "shares one arena with the KV pool, and the split moves with the workload",
    )  # fmt: skip
    g.add_argument(
        "--expert-slots", type=int, default=None, metavar="N",
        help="exact number of GPU expert slots at start (also turns offloading on)",
    )  # fmt: skip
    g.add_argument(
        "--expert-cache-policy", default="lfru", choices=list(MoEConfig.POLICIES),
        help="expert eviction: lfru (layer-aware frequency, default) or lru",
    )  # fmt: skip
    g.add_argument(
        "--no-expert-prefetch", action="store_true",
        help="do not copy the experts that layer i+1's router predicts from layer i early",
    )  # fmt: skip
    g.add_argument(
        "--expert-cpu-compute", default="auto", choices=list(MoEConfig.CPU_COMPUTE),
        help="compute missing experts on the CPU: auto (a start-up cost model decides), on, off",
    )  # fmt: skip
    g.add_argument(
        "--expert-miss-precision", default="full", choices=list(MoEConfig.PRECISIONS),
        help="on a miss of a low-importance expert, load an int8/int4 copy (default full)",
    )  # fmt: skip
    g.add_argument(
        "--expert-low-precision-threshold", type=float, default=0.1, metavar="W",
        help="a miss loads low precision when all its gate weights are below W (default 0.1)",
    )  # fmt: skip
    g.add_argument(
        "--rebalance-interval", type=int, default=32, metavar="STEPS",
        help="steps between KV/expert budget decisions; 0 keeps the split fixed (default 32)",
    )  # fmt: skip


def moe_from_args(args: argparse.Namespace) -> MoEConfig:
    return MoEConfig(
        gpu_memory=args.gpu_memory,
        expert_slots=args.expert_slots,
        policy=args.expert_cache_policy,
        prefetch=not args.no_expert_prefetch,
        cpu_compute=args.expert_cpu_compute,
        miss_precision=args.expert_miss_precision,
        low_precision_threshold=args.expert_low_precision_threshold,
        rebalance_interval=args.rebalance_interval,
    )


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


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "kv_cache_memory": args.kv_cache_memory,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "block_size": args.block_size,
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_policy": args.kv_policy,
        "kv_budget": args.kv_budget,
        "kv_evict_interval": args.kv_evict_interval,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "enable_prefix_caching": not args.no_prefix_caching,
        "seed": args.seed,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.no_cuda_graphs,
        "kv_cpu_memory": args.kv_cpu_memory,
        "kv_disk_dir": args.kv_disk_dir,
        "kv_disk_size": args.kv_disk_size,
        "kv_remote": args.kv_remote,
        "kv_remote_timeout_s": args.kv_remote_timeout,
        "kv_tier_eviction": args.kv_tier_eviction,
        "preemption_mode": args.preemption_mode,
        "session_gpu_fraction": args.session_gpu_fraction,
        "moe": moe_from_args(args),
    }


def llm_from_args(args: argparse.Namespace) -> LLM:
    return LLM(**llm_kwargs(args))


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

    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    kwargs = llm_kwargs(args)
    return serve(
        lambda: LLM(**kwargs).engine,
        model_name=args.served_model_name or model_name(args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("STRATA_API_KEY") or None,
        max_waiting_requests=args.max_waiting_requests,
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
    )


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from strata.bench.moe import run

    run(args)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from strata.bench.throughput import run

    run(args)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from strata.env_report import gather, render

    facts = gather(args.kv_remote)
    if args.json:
        print(json.dumps({f.name: f.value for f in facts}, indent=2))
    else:
        print(render(facts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Strata: LLM inference for models whose working memory does not fit "
        "on the GPU.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the results")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument(
        "--no-chat-template",
        action="store_true",
        help="send the prompt as raw text (default: wrap it as a user message in the "
        "model's chat template, when it has one)",
    )
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=256)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat that streams the reply")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    srv.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $STRATA_API_KEY; "
        "unset = no key)",
    )  # fmt: skip
    srv.add_argument(
        "--served-model-name", default=None,
        help="the model name clients send and /v1/models lists (default: the --model value, "
        "or smollm2-135m for the embedded model)",
    )  # fmt: skip
    srv.add_argument(
        "--max-waiting-requests", type=int, default=None, metavar="N",
        help="answer 429 with Retry-After once N requests are waiting (default: unlimited)",
    )  # fmt: skip
    srv.add_argument(
        "--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
        help="on SIGTERM, let requests in flight finish for this long (default 30)",
    )  # fmt: skip
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser(
        "throughput",
        help="offline throughput on random prompts (optionally against HF transformers)",
    )
    tp.add_argument("--num-requests", type=int, default=64, help="requests (default 64)")
    tp.add_argument(
        "--input-len", type=parse_range, default=(100, 1024), metavar="LOW-HIGH",
        help="prompt length range, uniform (default 100-1024)",
    )  # fmt: skip
    tp.add_argument(
        "--output-len", type=parse_range, default=(100, 1024), metavar="LOW-HIGH",
        help="output length range, uniform; EOS is ignored (default 100-1024)",
    )  # fmt: skip
    tp.add_argument(
        "--concurrency", type=int, nargs="+", default=[256], metavar="N",
        help="requests in flight at once; several values run one after another (default 256)",
    )  # fmt: skip
    tp.add_argument(
        "--compare-hf", action="store_true",
        help="also run HF transformers generate on the same model, device and requests, "
        "in batches of each --concurrency",
    )  # fmt: skip
    tp.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    add_engine_args(tp)
    add_url_args(tp)
    tp.set_defaults(func=cmd_bench_throughput)

    bm = bench_sub.add_parser(
        "moe",
        help="MoE expert offloading: decode tok/s at 25/50/100%% of experts resident, against "
        "the link-bandwidth bound and a naive copy-on-demand baseline",
    )
    from strata.bench.moe import add_args as add_moe_bench_args

    add_moe_bench_args(bm)
    bm.set_defaults(func=cmd_bench_moe)

    bs = bench_sub.add_parser(
        "serve",
        help="load test of a running OpenAI-compatible server (Strata, vLLM): streaming "
        "requests at Poisson or bursty arrival rates; TTFT, TPOT, ITL, throughput, goodput",
    )
    add_serve_args(bs)
    bs.set_defaults(func=cmd_bench_serve)

    bt = bench_sub.add_parser(
        "tiers",
        help="KV tiers: TTFT of long-document QA with the context recomputed or loaded from "
        "the GPU pool, cpu, disk or remote tier, and multi-round chat with tiers off/on",
        description=TIERS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_tiers_args(bt)
    bt.set_defaults(func=cmd_bench_tiers)

    add_eval_parser(sub, add_engine_args)

    env = sub.add_parser(
        "env",
        help="print what a bug report needs: versions of Strata, Python, torch, transformers, "
        "triton and CUDA, the device and its memory, a Valkey/Redis server, the lock",
    )
    env.add_argument(
        "--kv-remote", default=os.environ.get("STRATA_KV_REMOTE", "redis://127.0.0.1:6379"),
        help="the Valkey/Redis URL to look for (default: $STRATA_KV_REMOTE, else "
        "redis://127.0.0.1:6379)",
    )  # fmt: skip
    env.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    env.set_defaults(func=cmd_env)
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
