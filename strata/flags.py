"""Command-line flags generated from options (strata/options.py).

Each option becomes one flag whose dest is the option's keyword, so the parsed namespace
maps straight back to keywords (`keywords_from_args`) and to a config (`options.build`).

    int, float          type=int / float
    str                 the text as given
    Literal[...]        choices, in the Literal's order
    bool                a flag without a value that sets the opposite of the default
    tuple[X, ...]       one or more values (nargs="+"), or the flag once per value
                        (action="append") for an option with repeat=True
    Option.parse        type=parse (ranges, rates: whatever the field type cannot say)
    no default          required
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Literal

from strata.options import OptionField, literal_choices

Group = argparse.ArgumentParser | argparse._ArgumentGroup
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]  # every command's --log-level


@dataclass(frozen=True)
class FlagGroup:
    """A titled group of flags in --help: the options under `section` (field names from
    the root config), unless a later group claims a deeper section."""

    section: tuple[str, ...]
    title: str
    description: str | None = None


def add_flag_groups(
    parser: argparse.ArgumentParser,
    options: Iterable[OptionField],
    groups: Iterable[FlagGroup],
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> dict[tuple[str, ...], Group]:
    """`add_flags` with each option in the group of its deepest listed section; returns
    the argparse groups by section, for a command to add flags of its own."""
    made: dict[tuple[str, ...], Group] = {
        g.section: parser.add_argument_group(g.title, g.description) for g in groups
    }
    for o in options:
        section = max((s for s in made if o.section[: len(s)] == s), key=len, default=())
        add_flags(made.get(section, parser), [o], defaults, helps)
    return made


def add_flags(
    group: Group,
    options: Iterable[OptionField],
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add a flag for each option meant for the command line. `defaults` and `helps`
    replace, by keyword, the default and help text of a command that sets the option
    differently from the config (a benchmark's bigger timeout, say)."""
    defaults = defaults or {}
    helps = helps or {}
    for o in options:
        if not o.spec.cli:
            continue
        default = defaults.get(o.keyword, o.default)
        help_text = helps.get(o.keyword, o.spec.help)
        group.add_argument(o.flag, dest=o.keyword, help=help_text, **_how(o, default))


def _how(o: OptionField, default: Any) -> dict[str, Any]:
    """The argparse arguments that say how a flag takes its value."""
    if o.value_type is bool:
        return {"action": "store_false" if default else "store_true", "default": default}
    how: dict[str, Any] = {"required": True} if default is MISSING else {"default": default}
    value_type = o.value_type
    if typing.get_origin(value_type) is tuple and typing.get_args(value_type)[-1:] == (...,):
        if o.spec.repeat:
            how["action"] = "append"
        else:
            how["nargs"] = "+"
        value_type = typing.get_args(value_type)[0]
    choices = literal_choices(value_type)
    if choices is not None:
        how["choices"] = list(choices)
    elif o.spec.parse is not None:
        how["type"] = o.spec.parse
    elif value_type in (int, float):
        how["type"] = value_type
    if o.spec.metavar is not None:
        how["metavar"] = o.spec.metavar
    return how


def keywords_from_args(args: argparse.Namespace, options: Iterable[OptionField]) -> dict[str, Any]:
    """The options a command has flags for, by keyword, as parsed (lists as tuples)."""
    found = {}
    for o in options:
        if hasattr(args, o.keyword):
            value = getattr(args, o.keyword)
            found[o.keyword] = tuple(value) if isinstance(value, list) else value
    return found
