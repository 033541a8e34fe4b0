"""Options: the fields of a config dataclass that users set by name.

A field is an option when its metadata comes from `option(...)`: it then holds an
`Option` with the help text, and the keyword and flag where they differ from the field
name. Type, default and choices (a `Literal` type) are read from the field itself, so one
declaration defines the `LLM(...)` keyword, the command-line flag (strata/flags.py) and
the documentation of both.

A field whose type is a config dataclass is a section; its options are flattened into one
namespace of keywords with the parent's:

    EngineConfig.model                  keyword model             flag --model
    EngineConfig.cache.block_size       keyword block_size        flag --block-size
    EngineConfig.cache.tiers.remote     keyword kv_remote         flag --kv-remote
    EngineConfig.moe.prefetch           keyword expert_prefetch   flag --no-expert-prefetch
"""

from __future__ import annotations

import dataclasses
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C")

METADATA_KEY = "strata.option"


@dataclass(frozen=True)
class Option:
    """How a config field is named and explained to users.

    help: what the option means; for a bool, what the value opposite to its default does
    (which is what its flag does).
    keyword: the `LLM(...)` keyword and argparse dest; None: the field name.
    flag: the command-line flag; None: "--" + the keyword with dashes. A bool option's flag
    takes no value and sets the opposite of its default (--no-prefix-caching).
    cli: False keeps the option off the command line (a keyword only).
    metavar: the flag's value placeholder in --help.
    parse: the flag's argparse `type` where the field type does not say how to parse.
    repeat: a tuple option whose flag is given once per value (`--api-key A --api-key B`)
    instead of taking several values after one flag.
    """

    help: str
    keyword: str | None = None
    flag: str | None = None
    cli: bool = True
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    repeat: bool = False


def option(
    help: str,
    *,
    keyword: str | None = None,
    flag: str | None = None,
    cli: bool = True,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    repeat: bool = False,
) -> dict[str, Option]:
    """The metadata that makes a dataclass field an option:
    `field(default=16, metadata=option("tokens per KV block"))`."""
    return {METADATA_KEY: Option(help, keyword, flag, cli, metavar, parse, repeat)}


@dataclass(frozen=True)
class OptionField:
    """One option of a config tree: the field at `path` (field names from the root)."""

    path: tuple[str, ...]
    value_type: Any  # the field's annotation without None: int, float, str, bool, a Literal
    optional: bool  # None is a valid value
    default: Any  # MISSING when the option is required
    spec: Option

    @property
    def keyword(self) -> str:
        return self.spec.keyword or self.path[-1]

    @property
    def flag(self) -> str:
        return self.spec.flag or "--" + self.keyword.replace("_", "-")

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return literal_choices(self.value_type)

    @property
    def section(self) -> tuple[str, ...]:
        return self.path[:-1]


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a Literal type (None for any other type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, whether None was in it); an option has one other type."""
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return annotation, False
    rest = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"an option is of one type, or of one type or None; got {annotation}")
    return rest[0], True


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def sections(cls: type) -> dict[str, type]:
    """The fields of config `cls` that are config dataclasses themselves, by name."""
    hints = _hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def flatten(cls: type, path: tuple[str, ...] = ()) -> tuple[OptionField, ...]:
    """Every option of config `cls` and of its sections, in field order."""
    found: list[OptionField] = []
    nested = sections(cls)
    for f in dataclasses.fields(cls):
        if f.name in nested:
            found += flatten(nested[f.name], (*path, f.name))
        elif METADATA_KEY in f.metadata:
            value_type, optional = _without_none(_hints(cls)[f.name])
            spec = f.metadata[METADATA_KEY]
            found.append(OptionField((*path, f.name), value_type, optional, f.default, spec))
    keywords = [o.keyword for o in found]
    clashes = sorted({k for k in keywords if keywords.count(k) > 1})
    if clashes:
        raise TypeError(f"{cls.__name__}: options share the keywords {', '.join(clashes)}")
    return tuple(found)


def check_choices(config: Any) -> None:
    """Raise ValueError naming the valid values unless every Literal option of `config`
    (not of its sections) holds one of them."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        if METADATA_KEY not in f.metadata:
            continue
        value_type, optional = _without_none(hints[f.name])
        choices = literal_choices(value_type)
        value = getattr(config, f.name)
        if choices is None or value in choices or (optional and value is None):
            continue
        keyword = f.metadata[METADATA_KEY].keyword or f.name
        raise ValueError(f"{keyword} must be one of {', '.join(choices)}; got {value!r}")


def build(cls: type[C], values: Mapping[str, Any]) -> C:
    """Config `cls` with the options in `values` (keyword -> value) set and the rest at
    their defaults. A value under a section's name is that whole section (for example
    moe=MoEConfig(...)); None there means its defaults.

    Raises TypeError listing the valid keywords for an unknown one, and ValueError for a
    section given whole together with anything inside it.
    """
    keywords = {o.path: o.keyword for o in flatten(cls)} | _section_paths(cls)
    unknown = [k for k in values if k not in keywords.values()]
    if unknown:
        valid = ", ".join(keywords.values())
        raise TypeError(f"unknown option {', '.join(map(repr, unknown))}; valid: {valid}")
    return _build(cls, (), keywords, values)


def _section_paths(cls: type, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """Every section below `cls`: its path -> its field name (the keyword giving it whole)."""
    found: dict[tuple[str, ...], str] = {}
    for name, section in sections(cls).items():
        key = (*path, name)
        found[key] = name
        found.update(_section_paths(section, key))
    return found


def _build(
    cls: type[C],
    path: tuple[str, ...],
    keywords: dict[tuple[str, ...], str],
    values: Mapping[str, Any],
) -> C:
    kwargs: dict[str, Any] = {}
    nested = sections(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        here = (*path, f.name)
        if f.name in nested and values.get(f.name) is not None:
            inside = [k for p, k in keywords.items() if p[: len(here)] == here and k in values]
            if len(inside) > 1:
                also = ", ".join(k for k in inside if k != f.name)
                raise ValueError(f"give {f.name}= or its options ({also}), not both")
            kwargs[f.name] = values[f.name]
        elif f.name in nested:
            kwargs[f.name] = _build(nested[f.name], here, keywords, values)
        elif keywords.get(here) in values:
            kwargs[f.name] = values[keywords[here]]
    return cls(**kwargs)


def describe(options: tuple[OptionField, ...], indent: str = "    ") -> str:
    """One paragraph per option, `keyword = default: help`, for a docstring (a bool's
    help is that of the other value: `keyword = True; False: help`)."""
    lines = []
    for o in options:
        default = "required" if o.default is MISSING else repr(o.default)
        meaning = f"; {not o.default}: " if o.value_type is bool else ": "
        text = f"{o.keyword} = {default}{meaning}{o.spec.help}"
        lines.append(textwrap.fill(text, 88, initial_indent=indent, subsequent_indent=indent * 2))
    return "\n".join(lines)
