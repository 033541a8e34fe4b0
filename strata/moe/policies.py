"""Eviction policies of the GPU expert cache, chosen by name.

A policy only ranks the resident experts; the cache (expert_cache.py) owns the slots
and tells the policy about every access, insertion and removal. `victim` never returns
a key in `exclude` (experts pinned by the layer being computed).

- lru: least recently used first, across all layers. Decode touches layers 0..L-1 in
  turn, so with fewer slots than the working set every layer evicts the next layer's
  experts just before they are needed, and a prefill touching many experts of early
  layers wipes out the rest.
- lfru: layer-aware. Each layer has a fair share, capacity // layers slots (at least 1).
  A layer below its share takes a slot from the layer furthest above its share; a layer
  at or above its share evicts among its own experts. Within a layer the victim has
  the lowest aged frequency, ties broken by least recent use. Frequencies halve every
  `half_life` accesses of the layer, so a shift in routing is followed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from collections.abc import Collection

from strata.registry import Registry

ExpertKey = tuple[int, int]  # (layer, expert)


class EvictionPolicy(ABC):
    name: str

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    @abstractmethod
    def on_insert(self, key: ExpertKey) -> None: ...

    @abstractmethod
    def on_access(self, key: ExpertKey) -> None: ...

    @abstractmethod
    def on_remove(self, key: ExpertKey) -> None: ...

    @abstractmethod
    def victim(
        self, for_layer: int, capacity: int, exclude: Collection[ExpertKey]
    ) -> ExpertKey | None:
        """The resident expert to evict so `for_layer` can load one; None if all excluded."""


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # least recent first

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None

    def on_access(self, key: ExpertKey) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: ExpertKey) -> None:
        del self._order[key]

    def victim(
        self, for_layer: int, capacity: int, exclude: Collection[ExpertKey]
    ) -> ExpertKey | None:
        return next((k for k in self._order if k not in exclude), None)


class LayerLFRUPolicy(EvictionPolicy):
    name = "lfru"

    def __init__(self, num_layers: int, half_life: int = 256) -> None:
        super().__init__(num_layers)
        self.half_life = half_life
        self._freq: dict[ExpertKey, float] = defaultdict(float)  # kept across evictions
        self._accesses = [0] * num_layers
        self._clock = 0
        self._last_use: dict[ExpertKey, int] = {}
        self._resident: list[set[ExpertKey]] = [set() for _ in range(num_layers)]

    def on_insert(self, key: ExpertKey) -> None:
        self._resident[key[0]].add(key)
        self.on_access(key)

    def on_access(self, key: ExpertKey) -> None:
        layer = key[0]
        self._accesses[layer] += 1
        if self._accesses[layer] % self.half_life == 0:
            for k in [k for k in self._freq if k[0] == layer]:
                self._freq[k] *= 0.5
        self._freq[key] += 1.0
        self._clock += 1
        self._last_use[key] = self._clock

    def on_remove(self, key: ExpertKey) -> None:
        self._resident[key[0]].discard(key)
        self._last_use.pop(key, None)

    def victim(
        self, for_layer: int, capacity: int, exclude: Collection[ExpertKey]
    ) -> ExpertKey | None:
        share = max(1, capacity // self.num_layers)
        held = [len(r) for r in self._resident]
        layers: list[int] = []
        if held[for_layer] < share:
            over = sorted(
                (i for i in range(self.num_layers) if held[i] > share),
                key=lambda i: (share - held[i], i),
            )
            layers.extend(over)
        layers.append(for_layer)
        # Fall back to every layer, most-held first, so a victim is found whenever one exists.
        layers.extend(sorted(range(self.num_layers), key=lambda i: (-held[i], i)))
        for layer in layers:
            candidates = [k for k in self._resident[layer] if k not in exclude]
            if candidates:
                return min(candidates, key=lambda k: (self._freq[k], self._last_use[k]))
        return None


POLICIES: Registry[type[EvictionPolicy]] = Registry(
    "expert cache policy", {"lru": LRUPolicy, "lfru": LayerLFRUPolicy}
)


def make_policy(name: str, num_layers: int) -> EvictionPolicy:
    return POLICIES.get(name)(num_layers)
