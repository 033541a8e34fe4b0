"""PyramidKV (Cai et al., 2024): SnapKV with budgets that shrink with depth.

With an average of `keep` tokens per layer, each layer keeps the observation window plus
a share of the rest, `excess = keep - window`, that falls linearly from the first layer
(2 * excess - excess / BETA) to the last (excess / BETA); the mean stays `keep`.

Memory: block tables are shared by all layers, so the sequence holds blocks for its
largest layer (about twice the average budget beyond the window). Shallower layers are
not masked: each layer attends over its own length (runtime/step_kv.py).
"""

from __future__ import annotations

from strata.kv.policies.base import KVView
from strata.kv.policies.snapkv import SnapKVPolicy


class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"
    BETA = 20

    def layer_budgets(self, keep: int, view: KVView) -> list[int]:
        layers = self.shape.num_layers
        window = self.window(view.context_len)
        excess = keep - window
        if excess <= 0 or layers == 1:
            return [keep] * layers
        low = excess / self.BETA
        high = 2 * excess - low
        step = (high - low) / (layers - 1)
        return [min(window + round(high - i * step), view.context_len) for i in range(layers)]
