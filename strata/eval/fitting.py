"""Grow a task's haystack to the largest size whose prompt fits the length budget."""

from __future__ import annotations

from collections.abc import Callable

from strata.eval.sample import Sample

MAX_SIZE = 1 << 20  # no task's haystack gets near this: a build that stops growing errs


def largest_fitting(build: Callable[[int], Sample], fits: Callable[[Sample], bool]) -> Sample:
    """The sample `build(n)` for the largest n >= 1 with `fits(build(n))`.

    `build` must be deterministic in n and grow with it. Doubles until a size does not
    fit, then bisects: O(log n) builds. Raises ValueError if even n = 1 does not fit.
    """
    smallest = build(1)
    if not fits(smallest):
        raise ValueError(
            f"task {smallest.task}: the length is too short for even the smallest prompt"
        )
    good, bad = 1, 2
    while fits(build(bad)):
        if bad >= MAX_SIZE:
            raise ValueError(f"task {smallest.task}: the prompt still fits at size {bad}")
        good, bad = bad, bad * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(build(mid)):
            good = mid
        else:
            bad = mid
    return build(good)
