"""What keeping a cached block is worth: one value model for every cost-aware eviction
order, the GPU pool's (pool_order.py) and the tiers' (tiers/eviction.py).

    value(b) = L + uses(b) * recompute_cost(position(b))     GreedyDual-style
    recompute_cost(j) = 1 + slope * j

Recomputing block j alone (the blocks after it are reused around the hole) costs its own
tokens' layers (1) plus attention over the j blocks before it (slope: attention_slope in
pool_order.py). uses(b) is one plus the hits that reused b. L, the value of the last block
evicted, ages every kept block: one unused while others were evicted falls below newer ones.
"""

from __future__ import annotations


def recompute_cost(position: int, slope: float) -> float:
    """Relative cost of recomputing block `position` of a prefix alone."""
    return 1.0 + slope * position


def keep_value(inflation: float, uses: int, position: int, slope: float) -> float:
    """The eviction value of a block: lowest goes first."""
    return inflation + uses * recompute_cost(position, slope)
