"""The command line of `strata bench serve`: its flags, and the run they describe."""

from __future__ import annotations

import argparse
import math

from strata.bench.latency import SLO
from strata.bench.requests import DEFAULT_VOCAB_SIZE
from strata.bench.serve import ServeBenchConfig, run_serve_bench
from strata.bench.workload import parse_range


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0, got {text!r}")
    return rate


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `strata bench serve` (strata.cli adds them to its subparser)."""
    p.description = (
        "Replay random requests against an OpenAI-compatible server, streaming, and report "
        "request and token throughput, goodput, and TTFT (time to the first chunk with "
        "content), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (gaps between content "
        "chunks) and E2E latency as mean/p50/p90/p99. Output tokens come from the usage "
        "chunk. Exit code: 0 when every request completed well formed, 1 when any failed "
        "(non-200, error or malformed chunk, no [DONE]) or was lost (timed out), 2 when the "
        "run could not start."
    )
    p.add_argument(
        "--url", required=True,
        help="root URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (Strata or "
        "vLLM; without /v1)",
    )  # fmt: skip
    p.add_argument(
        "--endpoint", choices=["completions", "chat"], default="completions",
        help="/v1/completions or /v1/chat/completions (default completions)",
    )  # fmt: skip
    p.add_argument(
        "--model", default=None,
        help="model name sent in each request (default: the first model /v1/models lists)",
    )  # fmt: skip
    p.add_argument(
        "--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)"
    )
    p.add_argument(
        "--num-requests", type=int, default=200, help="requests per request rate (default 200)"
    )
    p.add_argument(
        "--request-rate", type=_rate, nargs="+", default=[math.inf], metavar="R",
        help="mean arrivals per second; inf sends all at once. Several values run one after "
        "another as a sweep, each on a fresh workload (default inf)",
    )  # fmt: skip
    p.add_argument(
        "--burstiness", type=float, default=1.0, metavar="B",
        help="shape of the gamma-distributed gaps between arrivals (mean 1/R): 1 = Poisson, "
        "< 1 burstier (as in BurstGPT), > 1 more regular (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--max-concurrency", type=int, default=None, metavar="N",
        help="at most N requests in flight; later arrivals wait for a slot (default: no cap)",
    )  # fmt: skip
    p.add_argument(
        "--input-len", type=parse_range, default=(100, 1024), metavar="LOW-HIGH",
        help="prompt length in tokens, uniform in the range (default 100-1024)",
    )  # fmt: skip
    p.add_argument(
        "--output-len", type=parse_range, default=(100, 1024), metavar="LOW-HIGH",
        help="output length in tokens, uniform; sent as max_tokens with ignore_eos, so it is "
        "exact (default 100-1024)",
    )  # fmt: skip
    p.add_argument(
        "--prompts", choices=["token-ids", "text"], default=None,
        help="random token ids (exact lengths; completions only) or text of common words "
        "(about one token per word; the server's usage gives the exact count). "
        "Default: token-ids for completions, text for chat",
    )  # fmt: skip
    p.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="V",
        help=f"token ids are drawn from [100, V) (default {DEFAULT_VOCAB_SIZE}, valid for "
        "any model with at least that many tokens)",
    )  # fmt: skip
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the workload and arrivals (default 0)"
    )
    p.add_argument(
        "--slo-ttft-ms", type=float, default=None, metavar="MS",
        help="time-to-first-token objective; with it (or --slo-tpot-ms) goodput is reported: "
        "completed requests per second that meet every objective",
    )  # fmt: skip
    p.add_argument(
        "--slo-tpot-ms", type=float, default=None, metavar="MS",
        help="time-per-output-token objective, for goodput",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout", type=float, default=3600.0, metavar="SECONDS",
        help="a request whose server stays silent this long is counted as lost (default 3600)",
    )  # fmt: skip
    p.add_argument(
        "--json", default=None, metavar="PATH",
        help="write the config, the summary of each rate and every request's record as JSON",
    )  # fmt: skip
    p.add_argument(
        "--plot", default=None, metavar="PATH.png",
        help="write a PNG: TTFT/TPOT histograms and latency per request for one rate; "
        "TTFT/TPOT p50/p99 and throughput against the rate for a sweep",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return ServeBenchConfig(
        url=args.url,
        num_requests=args.num_requests,
        request_rates=tuple(args.request_rate),
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        endpoint=args.endpoint,
        prompts=args.prompts,
        model=args.model,
        api_key=args.api_key,
        vocab_size=args.vocab_size,
        temperature=args.temperature,
        seed=args.seed,
        slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms),
        request_timeout_s=args.request_timeout,
        json_path=args.json,
        plot_path=args.plot,
        progress=not args.no_progress,
    )


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Exit code 0 when every request of every rate completed, 1 otherwise."""
    return 0 if run_serve_bench(config_from_args(args)).passed else 1
