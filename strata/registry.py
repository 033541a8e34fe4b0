"""Registry[T]: pluggable parts chosen by name (attention backends, KV policies, KV codecs,
tier eviction orders, expert-cache policies).

An entry is either the object itself or a "module:attribute" string imported on first
use, so that checking a name (a request's `kv_policy`, a CLI flag) imports nothing heavy.
Unknown names raise ValueError listing the valid ones, in registration order.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, entries: dict[str, T | str] | None = None) -> None:
        self.what = what  # how error messages name a key: "kv_policy", "attention backend"
        self._entries: dict[str, T | str] = dict(entries or {})

    def register(self, name: str, entry: T | str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def check(self, name: str) -> None:
        """Raise ValueError naming the valid keys unless `name` is one."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; valid: {', '.join(self._entries)}")

    def get(self, name: str) -> T:
        """The entry under `name`, imported on first use."""
        self.check(name)
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attribute = entry.split(":")
            loaded: T = getattr(importlib.import_module(module), attribute)
            self._entries[name] = loaded
            return loaded
        return entry

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self._entries:
            yield name, self.get(name)
