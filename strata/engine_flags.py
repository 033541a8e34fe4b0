"""The engine's command-line flags: one per engine option (strata/config.py), shared by
every command that builds an engine."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from strata.config import ENGINE_OPTIONS
from strata.flags import FlagGroup, LogLevel, add_flag_groups, keywords_from_args

ENGINE_GROUPS = (
    FlagGroup((), "model and engine"),
    FlagGroup(
        ("cache", "tiers"),
        "KV tiers",
        "Full KV blocks are written through to these tiers as they are computed; a prefix "
        "found in any tier is loaded back instead of recomputed.",
    ),
    FlagGroup(
        ("cache", "recall"),
        "KV recall store",
        "Recall policies (--kv-policy quest, shadowkv, clusterkv, pqcache, magicpig or "
        "full_offload) keep every block of a sequence in pinned host memory and attend, each "
        "decode step, the blocks they pick (magicpig: the keys it samples, on the host); so a "
        "sequence's KV may be larger than the GPU.",
    ),
    FlagGroup(("moe",), "MoE expert offloading (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE)"),
)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """A flag for every engine option, and --log-level."""
    groups = add_flag_groups(p, ENGINE_OPTIONS, ENGINE_GROUPS)
    groups[()].add_argument(
        "--log-level", default="INFO", choices=typing.get_args(LogLevel),
        help="log level of the engine's messages on stderr (default INFO)",
    )  # fmt: skip


def engine_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM(...)` keywords of the engine flags a command has."""
    return keywords_from_args(args, ENGINE_OPTIONS)
