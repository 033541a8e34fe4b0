"""TierLoads: the scheduler's side of the KV tiers, and its no-op when tiers are off.

One sequence's path through it, as the scheduler calls it:

    add ──► probe ──(remote lookup in flight: not admitted)──► probed
    admit ──► hits: the blocks after its GPU prefix match that some tier holds (matched
          past holes: every block the GPU match lacks that a tier holds)
          └─► start: it waits in `loading` ──► landed: its loaded prefix is computed ──► run
    finish while loading ──► abandoned: its blocks are freed when the load lands
    preempt ──► swap_out: its blocks stay pinned in the CPU tier ──► resumed: unpinned

Blocks a step indexes are written through to the tiers (`write_through`). Sequences are
any objects with the fields of `TieredSequence`, so this package needs no engine import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from strata.kv.manager import PrefixMatch
from strata.kv.prefix import BlockRef


class TieredSequence(Protocol):
    request_id: str
    token_ids: list[int]
    num_computed: int
    num_cached_tokens: int  # prefix-cache hit at first admission; -1 before

    @property
    def cache_salt(self) -> str | None:
        """The cache partition its blocks are keyed in (prefix.salted_root)."""
        ...


S = TypeVar("S", bound=TieredSequence)

TierHit = tuple[int, BlockRef]  # (block index in the sequence, the block's key and tokens)

_NONE_LOADING: Mapping[str, Any] = MappingProxyType({})


class TierLoads(ABC, Generic[S]):
    @property
    @abstractmethod
    def loading(self) -> Mapping[str, S]:
        """Admitted sequences whose prefix is still being copied into the pool, by id."""

    @property
    @abstractmethod
    def in_flight(self) -> bool:
        """Whether any load is still writing pool blocks (of a live or finished sequence)."""

    @abstractmethod
    def probe(self, seq: S) -> None:
        """A sequence arrived: look its prefix up in the remote tier, if there is one."""

    @abstractmethod
    def is_probing(self, seq: S) -> bool:
        """Whether the sequence's remote lookup is still in flight (it waits for it)."""

    @abstractmethod
    def hits(self, seq: S, token_ids: Sequence[int], match: PrefixMatch) -> list[TierHit]:
        """The blocks of `token_ids` after the GPU `match` that some tier holds, ascending:
        the leading run of them, or (a match with holes) every one the GPU lacks."""

    @abstractmethod
    def start(self, seq: S, hits: list[TierHit]) -> None:
        """Load `hits` into the sequence's blocks at their indices (just admitted)."""

    @abstractmethod
    def landed(self) -> Sequence[S]:
        """Sequences whose load ended since the last call, their loaded tokens computed."""

    @abstractmethod
    def swap_out(self, seq: S) -> None:
        """Before a preemption frees its blocks: keep them in the CPU tier if reloading
        them beats recomputing them."""

    @abstractmethod
    def resumed(self, seq: S) -> None:
        """The sequence runs again: drop its swap pins."""

    @abstractmethod
    def finish(self, seq: S) -> bool:
        """Forget the sequence. True if its load is in flight: the mover still writes its
        blocks, which are freed when the load lands."""

    @abstractmethod
    def write_through(self, after: Any) -> None:
        """Queue the blocks indexed this step for the tiers, behind event `after`."""

    @abstractmethod
    def stats(self) -> dict[str, int]: ...


class NoTierLoads(TierLoads[S]):
    """Tiers off: nothing is probed, found, loaded, swapped or written through."""

    @property
    def loading(self) -> Mapping[str, S]:
        return _NONE_LOADING

    @property
    def in_flight(self) -> bool:
        return False

    def probe(self, seq: S) -> None:
        pass

    def is_probing(self, seq: S) -> bool:
        return False

    def hits(self, seq: S, token_ids: Sequence[int], match: PrefixMatch) -> list[TierHit]:
        return []

    def start(self, seq: S, hits: list[TierHit]) -> None:
        raise RuntimeError("no KV tiers to load from")  # `hits` is always empty

    def landed(self) -> Sequence[S]:
        return ()

    def swap_out(self, seq: S) -> None:
        pass

    def resumed(self, seq: S) -> None:
        pass

    def finish(self, seq: S) -> bool:
        return False

    def write_through(self, after: Any) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_tier_hit_tokens": 0, "num_swaps": 0, "num_loading": 0}
