"""RankShare: what each tensor-parallel rank sends rank 0 of one observed layer.

A rank holds some KV heads and their query heads. A policy's observation on rank 0 must
be the one a single rank would build over every head, so each policy names how its
pieces combine (`KVPolicy.rank_share`; runtime/gathered.py does the gathering):

    SUMMED      attention summed over the queries and each KV head's query heads,
                [its KV heads, slots]; rank 0 adds them (`LayerObservation.summed`)
    MAXED       the same attention's maximum instead of its sum; rank 0 takes the
                maximum (`LayerObservation.maxed`)
    QUERIES     its queries [m, its query heads, head_dim]; rank 0 concatenates the heads
                (`LayerObservation.queries`, every head)
    QUERIES_KV  QUERIES, and its KV heads' keys and values of the observed slots
                (`LayerObservation.keys/values`, every head)

A KV head replicated on several ranks (fewer KV heads than ranks) gets each rank's share
of its query heads: sums add up, maxima take the largest, keys and values are alike.
Under SUMMED and MAXED rank 0's observation holds no keys or values.
"""

from __future__ import annotations

from enum import IntEnum


class RankShare(IntEnum):
    SUMMED = 0
    MAXED = 1
    QUERIES = 2
    QUERIES_KV = 3
