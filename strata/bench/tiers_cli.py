"""Command-line flags of `strata bench tiers`."""

from __future__ import annotations

import argparse

from strata.bench.tiers_chat import MODES

DESCRIPTION = """\
Time to first token with the KV cache in each tier, on two workloads shaped like
LMCache's benchmarks (random token ids; use random:PRESET or random:CONFIG.json models).

long-document QA: documents of each --lengths, each asked --questions questions
(document + a short suffix). Per length, TTFT with the document recomputed, cached in
the GPU pool, loaded from the cpu tier (GPU cache emptied), from disk (a fresh engine on
the same disk dir, empty cpu tier; OS page cache warm for the first document of each
length, dropped with posix_fadvise for the others) and from the remote tier (a fresh
engine with only --kv-remote). Fetch bandwidth is compared with pinned host-to-device
bandwidth measured in the same run (CUDA only).

multi-round chat: --chat-users conversations of --chat-turns turns each, through a GPU
pool too small for them all, once per --chat-modes.
"""


def add_tiers_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p)
    _qa_args(p)
    _chat_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="PATH", help="write the results as JSON")
    g.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write a PNG: TTFT against context length per source, and chat TTFT per turn",
    )
    g.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the engine's and the benchmark's messages (default INFO)",
    )


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine (every engine the benchmark builds)")
    g.add_argument(
        "--model",
        default=None,
        help="as for `strata generate`: random:PRESET or random:CONFIG.json for random "
        "weights of a shape (e.g. a llama-3-8b copy with max_position_embeddings "
        "32768), a model folder, a .gguf; default the embedded model",
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
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens computed per step (prefill chunk size; default 2048)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random weights and the workloads' token ids (default 0)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "reference", "triton"],
        help="attention kernels; auto = triton on CUDA, else reference",
    )
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="GPU pool of the QA engines (default: two of the longest question)",
    )
    g.add_argument(
        "--kv-cpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="cpu tier of every tiered engine (default: three of the longest QA "
        "question; for chat 1.25x every conversation's final KV)",
    )
    g.add_argument(
        "--kv-disk-dir",
        default=None,
        metavar="PATH",
        help="disk tier directory of the QA run (default: a temporary one, removed after)",
    )
    g.add_argument("--no-disk", action="store_true", help="no disk tier: skip disk-warm/-cold")
    g.add_argument(
        "--kv-disk-size",
        type=float,
        default=64.0,
        metavar="GIB",
        help="cap of the disk tier (default 64)",
    )
    g.add_argument(
        "--kv-remote",
        default=None,
        metavar="URL",
        help="redis://host:port or valkey://host:port of a running server: the QA "
        "run also writes there and measures the remote source (default: skipped)",
    )
    g.add_argument(
        "--kv-remote-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds before a remote call counts as failed (default 2: multi-MiB blocks)",
    )


def _qa_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long-document QA")
    g.add_argument("--skip-qa", action="store_true", help="do not run the QA workload")
    g.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[8192, 16384, 32000],
        metavar="N",
        help="document lengths in tokens (default 8192 16384 32000)",
    )
    g.add_argument(
        "--docs-per-length",
        type=int,
        default=2,
        help="documents of each length (default 2; with 1, disk is measured with a "
        "warm page cache only)",
    )
    g.add_argument(
        "--questions",
        type=int,
        default=3,
        help="questions per document; all hit the GPU pool (default 3)",
    )
    g.add_argument(
        "--suffix-len", type=int, default=12, help="question tokens after the document (default 12)"
    )
    g.add_argument(
        "--max-tokens", type=int, default=4, help="tokens generated per question (default 4)"
    )


def _chat_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-round chat")
    g.add_argument("--skip-chat", action="store_true", help="do not run the chat workload")
    g.add_argument(
        "--chat-modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="tiers-off: no tiers; cpu: a cpu tier; cpu+sessions: a cpu tier and "
        "each turn carries session_id + cache_ttl_s (default: all three)",
    )
    g.add_argument("--chat-users", type=int, default=16, help="conversations (default 16)")
    g.add_argument("--chat-turns", type=int, default=5, help="turns per conversation (default 5)")
    g.add_argument(
        "--chat-first-len",
        type=int,
        default=2048,
        help="tokens of each conversation's first message (default 2048)",
    )
    g.add_argument(
        "--chat-message-len",
        type=int,
        default=256,
        help="tokens of each later user message (default 256)",
    )
    g.add_argument(
        "--chat-answer-len",
        type=int,
        default=32,
        help="tokens the model answers per turn, EOS ignored (default 32)",
    )
    g.add_argument(
        "--chat-concurrency", type=int, default=4, help="turns in flight at once (default 4)"
    )
    g.add_argument(
        "--chat-gpu-fraction",
        type=float,
        default=0.25,
        help="the GPU pool holds this fraction of the KV every conversation reaches "
        "(at least --chat-concurrency longest ones; default 0.25)",
    )
    g.add_argument(
        "--session-ttl",
        type=float,
        default=600.0,
        metavar="S",
        help="cache_ttl_s of the cpu+sessions mode (default 600)",
    )


def cmd_bench_tiers(args: argparse.Namespace) -> int:
    from strata.bench.tiers import run

    for name in (
        "lengths",
        "docs_per_length",
        "questions",
        "suffix_len",
        "max_tokens",
        "chat_users",
        "chat_turns",
        "chat_first_len",
        "chat_message_len",
        "chat_answer_len",
        "chat_concurrency",
    ):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {values}")
    if not 0 < args.chat_gpu_fraction <= 1:
        raise ValueError(f"--chat-gpu-fraction must be in (0, 1], got {args.chat_gpu_fraction}")
    run(args)
    return 0
