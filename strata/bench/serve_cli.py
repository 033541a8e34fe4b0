"""The command line of `strata bench serve`: its flags are ServeBenchConfig's fields."""

from __future__ import annotations

import argparse

from strata.bench.serve import ServeBenchConfig, run_serve_bench
from strata.flags import add_flags, keywords_from_args
from strata.options import build, flatten

DESCRIPTION = (
    "Replay random requests against an OpenAI-compatible server, streaming, and report "
    "request and token throughput, goodput, and TTFT (time to the first chunk with "
    "content), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (gaps between content "
    "chunks) and E2E latency as mean/p50/p90/p99. Output tokens come from the usage "
    "chunk. Exit code: 0 when every request completed well formed, 1 when any failed "
    "(non-200, error or malformed chunk, no [DONE]) or was lost (timed out), 2 when the "
    "run could not start."
)
OPTIONS = flatten(ServeBenchConfig)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `strata bench serve` (strata.cli adds them to its subparser)."""
    p.description = DESCRIPTION
    add_flags(p, OPTIONS)


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return build(ServeBenchConfig, keywords_from_args(args, OPTIONS))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Exit code 0 when every request of every rate completed, 1 otherwise."""
    return 0 if run_serve_bench(config_from_args(args)).passed else 1
