"""Subcommands of the `strata` command, declared as data and added to argparse in one place."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """A subcommand: either its flags and what it runs, or subcommands of its own.

    description: shown as written (line breaks kept) above the flags in --help.
    """

    name: str
    help: str
    add_args: tuple[AddArgs, ...] = ()
    run: Run | None = None
    description: str | None = None
    subcommands: tuple[Command, ...] = ()


def add_commands(parent: Any, commands: tuple[Command, ...]) -> None:
    """Add `commands` to `parent`, the result of an `add_subparsers` call."""
    for command in commands:
        extra: dict[str, Any] = {}
        if command.description is not None:
            extra = {
                "description": command.description,
                "formatter_class": argparse.RawDescriptionHelpFormatter,
            }
        p = parent.add_parser(command.name, help=command.help, **extra)
        for add_args in command.add_args:
            add_args(p)
        if command.subcommands:
            sub = p.add_subparsers(dest=command.name, required=True)
            add_commands(sub, command.subcommands)
        else:
            p.set_defaults(func=command.run)
