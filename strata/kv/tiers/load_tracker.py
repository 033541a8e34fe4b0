"""TierLoadTracker: `TierLoads` over a `TierManager`, kept by request id.

    _probing       remote lookups in flight: the keys asked about
    _remote_found  keys the remote tier said it holds, until the sequence finishes
    _loading       admitted, waiting for its load; `_loading_refs` the blocks on their way
    _abandoned     finished while loading: blocks freed when the load lands
    _swapped       preempted with its blocks held in the CPU tier (owner "swap:<id>")

A sequence is in at most one of `_loading` and `_abandoned`, and leaves `_probing`
before it is admitted. Every method runs on the engine thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from strata.kv.manager import KVManager, PrefixMatch
from strata.kv.prefix import salted_root
from strata.kv.tiers.jobs import LoadDone, ProbeDone
from strata.kv.tiers.loads import S, TierHit, TierLoads
from strata.kv.tiers.manager import TierManager


class TierLoadTracker(TierLoads[S]):
    def __init__(
        self,
        tiers: TierManager,
        kv: KVManager,
        preemption_mode: str = "recompute",
        swap_is_cheaper: Callable[[int], bool] | None = None,
    ) -> None:
        self.tiers = tiers
        self.kv = kv
        self.preemption_mode = preemption_mode
        self.swap_is_cheaper = swap_is_cheaper  # (computed tokens) -> reload beats recompute
        self._probing: dict[str, list[bytes]] = {}
        self._remote_found: dict[str, set[bytes]] = {}
        self._loading: dict[str, S] = {}
        self._loading_refs: dict[str, list[TierHit]] = {}
        self._abandoned: set[str] = set()
        self._swapped: set[str] = set()
        self.num_hit_tokens = 0
        self.num_swaps = 0

    @property
    def loading(self) -> Mapping[str, S]:
        return self._loading

    @property
    def in_flight(self) -> bool:
        return bool(self._loading or self._abandoned)

    # ---- before admission -------------------------------------------------------------------

    def probe(self, seq: S) -> None:
        if self.tiers.remote is None or not self.kv.enable_prefix_caching:
            return
        root = salted_root(self.kv.root, seq.cache_salt)
        keys = [r.key for r in self.kv.block_refs(seq.token_ids, 0, root)]
        if keys:
            self._probing[seq.request_id] = keys
            self.tiers.probe_remote(seq.request_id, keys)

    def is_probing(self, seq: S) -> bool:
        return seq.request_id in self._probing

    def hits(self, seq: S, token_ids: Sequence[int], match: PrefixMatch) -> list[TierHit]:
        if not self.kv.enable_prefix_caching:
            return []
        first = len(match.block_ids)
        parent = match.keys[-1] if match.keys else match.root
        on_gpu = {i for i, _ in match.ahead}
        refs = [(i, r) for i, r in enumerate(self.kv.block_refs(token_ids, first, parent), first)
                if i not in on_gpu]  # fmt: skip
        if not refs:
            return []
        found = self.tiers.find_local([r.key for _, r in refs])
        remote = self._remote_found.get(seq.request_id, set())
        held = [f or r.key in remote for f, (_, r) in zip(found, refs, strict=True)]
        if match.holes:
            return [hit for hit, h in zip(refs, held, strict=True) if h]
        n = held.index(False) if False in held else len(held)
        return refs[:n]

    # ---- loads ------------------------------------------------------------------------------

    def start(self, seq: S, hits: list[TierHit]) -> None:
        table = self.kv.block_table(seq.request_id)
        self._loading[seq.request_id] = seq
        self._loading_refs[seq.request_id] = hits
        blocks = [r for _, r in hits]
        self.tiers.start_load(seq.request_id, blocks, [table[i] for i, _ in hits])

    def landed(self) -> Sequence[S]:
        out: list[S] = []
        for event in self.tiers.poll():
            if isinstance(event, ProbeDone):
                self._probed(event)
            elif event.seq_id in self._abandoned:
                self._abandoned.discard(event.seq_id)
                self._loading_refs.pop(event.seq_id, None)
                self.kv.free(event.seq_id)
            else:
                out.append(self._land(event))
        return out

    def _probed(self, event: ProbeDone) -> None:
        keys = self._probing.pop(event.seq_id, None)
        if keys is not None:  # else it finished meanwhile
            found = zip(keys, event.found, strict=True)
            self._remote_found[event.seq_id] = {k for k, hit in found if hit}

    def _land(self, event: LoadDone) -> S:
        """Index the blocks that arrived; they join the sequence's valid blocks ahead, which
        its computed prefix skips (`KVManager.skip_reused`)."""
        seq = self._loading.pop(event.seq_id)
        hits = self._loading_refs.pop(event.seq_id)
        tokens = event.num_loaded * self.kv.block_size
        reused = seq.num_computed + self.kv.reused_ahead_tokens(seq.request_id)
        self.kv.mark_loaded(seq.request_id, hits[: event.num_loaded])
        seq.num_computed = self.kv.skip_reused(seq.request_id, seq.num_computed)
        self.num_hit_tokens += tokens
        if seq.num_cached_tokens >= 0 and seq.num_cached_tokens == reused:
            seq.num_cached_tokens += tokens
        self.resumed(seq)
        return seq

    # ---- swaps and the end ------------------------------------------------------------------

    def swap_out(self, seq: S) -> None:
        if not self._swap_pays(seq.num_computed):
            return
        self.tiers.hold(f"swap:{seq.request_id}", self.kv.keys_of(seq.request_id))
        self._swapped.add(seq.request_id)
        self.num_swaps += 1

    def _swap_pays(self, num_computed: int) -> bool:
        if self.preemption_mode == "recompute":
            return False
        if self.preemption_mode == "swap":
            return True
        # auto: the engine's cost model compares reloading the blocks with recomputing them
        return self.swap_is_cheaper is not None and self.swap_is_cheaper(num_computed)

    def resumed(self, seq: S) -> None:
        if seq.request_id in self._swapped:
            self._swapped.discard(seq.request_id)
            self.tiers.release(f"swap:{seq.request_id}")

    def finish(self, seq: S) -> bool:
        self._probing.pop(seq.request_id, None)
        self._remote_found.pop(seq.request_id, None)
        self.resumed(seq)
        if seq.request_id not in self._loading:
            return False
        del self._loading[seq.request_id]
        self._abandoned.add(seq.request_id)
        return True

    def write_through(self, after: Any) -> None:
        stored = self.kv.take_newly_indexed()
        self.tiers.store([r for _, r in stored], [b for b, _ in stored], after=after)

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_tier_hit_tokens": self.num_hit_tokens,
            "num_swaps": self.num_swaps,
            "num_loading": len(self._loading),
        }
