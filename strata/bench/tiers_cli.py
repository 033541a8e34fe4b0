"""Command-line flags of `strata bench tiers`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from strata.bench.tiers_chat import MODES, ChatMode
from strata.config import ENGINE_OPTIONS
from strata.flags import FlagGroup, LogLevel, add_flag_groups, keywords_from_args
from strata.options import build, flatten, option

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


# The engine options every engine of the benchmark takes from the command line; the
# benchmark sets the others (pool and tier sizes, max_num_seqs, max_model_len) itself.
ENGINE_KEYWORDS = (
    "model", "device", "dtype", "seed", "block_size", "max_num_batched_tokens",
    "attention_backend", "enforce_eager", "kv_cache_memory", "kv_cpu_memory", "kv_disk_dir",
    "kv_disk_size", "kv_disk_direct_io", "kv_remote", "kv_remote_timeout_s",
    "kv_tier_io_threads", "kv_tier_codec",
)  # fmt: skip
ENGINE_DEFAULTS = {"kv_disk_size": 64.0, "kv_remote_timeout_s": 2.0}
ENGINE_HELPS = {
    "model": "as for `strata generate`: random:PRESET or random:CONFIG.json for random "
    "weights of a shape (e.g. a llama-3-8b copy with max_position_embeddings 32768), a "
    "model folder, a .gguf; default the embedded model",
    "seed": "seed of the random weights and the workloads' token ids (default 0)",
    "kv_cache_memory": "GPU pool of the QA engines (default: two of the longest question)",
    "kv_cpu_memory": "cpu tier of every tiered engine (default: three of the longest QA "
    "question; for chat 1.25x every conversation's final KV)",
    "kv_disk_dir": "disk tier directory of the QA run (default: a temporary one, removed after)",
    "kv_disk_size": "cap of the disk tier (default 64)",
    "kv_remote": "redis://host:port or valkey://host:port of a running server: the QA run "
    "also writes there and measures the remote source (default: skipped)",
    "kv_remote_timeout_s": "seconds before a remote call counts as failed (default 2: "
    "multi-MiB blocks)",
    "kv_tier_codec": "code the blocks of every tiered engine (fp8, int8, int4; default "
    "none): loaded answers are then compared with recomputed ones, not expected equal",
}


def _at_least_one(values: dict[str, int | tuple[int, ...]]) -> None:
    for name, value in values.items():
        if any(v < 1 for v in (value if isinstance(value, tuple) else (value,))):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {shown}")


@dataclass(frozen=True)
class QAOptions:
    """The long-document QA workload."""

    skip_qa: bool = field(default=False, metadata=option("do not run the QA workload"))
    lengths: tuple[int, ...] = field(default=(8192, 16384, 32000), metadata=option(
        "document lengths in tokens (default 8192 16384 32000)", metavar="N",
    ))  # fmt: skip
    docs_per_length: int = field(default=2, metadata=option(
        "documents of each length (default 2; with 1, disk is measured with a warm page "
        "cache only)",
    ))  # fmt: skip
    questions: int = field(default=3, metadata=option(
        "questions per document; all hit the GPU pool (default 3)"
    ))  # fmt: skip
    suffix_len: int = field(
        default=12, metadata=option("question tokens after the document (default 12)")
    )
    max_tokens: int = field(
        default=4, metadata=option("tokens generated per question (default 4)")
    )

    def __post_init__(self) -> None:
        _at_least_one({
            "lengths": self.lengths, "docs_per_length": self.docs_per_length,
            "questions": self.questions, "suffix_len": self.suffix_len,
            "max_tokens": self.max_tokens,
        })  # fmt: skip


@dataclass(frozen=True)
class ChatOptions:
    """The multi-round chat workload."""

    skip_chat: bool = field(default=False, metadata=option("do not run the chat workload"))
    chat_modes: tuple[ChatMode, ...] = field(default=MODES, metadata=option(
        "tiers-off: no tiers; cpu: a cpu tier; cpu+sessions: a cpu tier and each turn "
        "carries session_id + cache_ttl_s (default: all three)",
    ))  # fmt: skip
    chat_users: int = field(default=16, metadata=option("conversations (default 16)"))
    chat_turns: int = field(default=5, metadata=option("turns per conversation (default 5)"))
    chat_first_len: int = field(default=2048, metadata=option(
        "tokens of each conversation's first message (default 2048)"
    ))  # fmt: skip
    chat_message_len: int = field(
        default=256, metadata=option("tokens of each later user message (default 256)")
    )
    chat_answer_len: int = field(default=32, metadata=option(
        "tokens the model answers per turn, EOS ignored (default 32)"
    ))  # fmt: skip
    chat_concurrency: int = field(
        default=4, metadata=option("turns in flight at once (default 4)")
    )
    chat_gpu_fraction: float = field(default=0.25, metadata=option(
        "the GPU pool holds this fraction of the KV every conversation reaches (at least "
        "--chat-concurrency longest ones; default 0.25)",
    ))  # fmt: skip
    session_ttl: float = field(default=600.0, metadata=option(
        "cache_ttl_s of the cpu+sessions mode (default 600)", metavar="S"
    ))  # fmt: skip

    def __post_init__(self) -> None:
        _at_least_one({
            "chat_users": self.chat_users, "chat_turns": self.chat_turns,
            "chat_first_len": self.chat_first_len, "chat_message_len": self.chat_message_len,
            "chat_answer_len": self.chat_answer_len, "chat_concurrency": self.chat_concurrency,
        })  # fmt: skip
        if not 0 < self.chat_gpu_fraction <= 1:
            raise ValueError(f"--chat-gpu-fraction must be in (0, 1], got {self.chat_gpu_fraction}")


@dataclass(frozen=True)
class OutputOptions:
    """Where the results go."""

    output: str | None = field(
        default=None, metadata=option("write the results as JSON", metavar="PATH")
    )
    plot: str | None = field(default=None, metadata=option(
        "write a PNG: TTFT against context length per source, and chat TTFT per turn",
        metavar="PATH",
    ))  # fmt: skip
    log_level: LogLevel = field(default="INFO", metadata=option(
        "log level of the engine's and the benchmark's messages (default INFO)"
    ))  # fmt: skip


@dataclass(frozen=True)
class TiersBenchOptions:
    """The benchmark's own flags; the engine flags are ENGINE_KEYWORDS' options."""

    no_disk: bool = field(default=False, metadata=option("no disk tier: skip disk-warm/-cold"))
    qa: QAOptions = field(default_factory=QAOptions)
    chat: ChatOptions = field(default_factory=ChatOptions)
    out: OutputOptions = field(default_factory=OutputOptions)


BENCH_OPTIONS = flatten(TiersBenchOptions)
GROUPS = (
    FlagGroup((), "model and engine (every engine the benchmark builds)"),
    FlagGroup(("qa",), "long-document QA"),
    FlagGroup(("chat",), "multi-round chat"),
    FlagGroup(("out",), "output"),
)


def add_tiers_args(p: argparse.ArgumentParser) -> None:
    engine = [o for o in ENGINE_OPTIONS if o.keyword in ENGINE_KEYWORDS]
    add_flag_groups(p, engine + list(BENCH_OPTIONS), GROUPS, ENGINE_DEFAULTS, ENGINE_HELPS)


def cmd_bench_tiers(args: argparse.Namespace) -> int:
    from strata.bench.tiers import run

    build(TiersBenchOptions, keywords_from_args(args, BENCH_OPTIONS))  # checks the values
    run(args)
    return 0
