"""The Pareto frontier of memory against time: the cells no other cell beats on both.

A cell is on the frontier when no other finished cell uses at most its memory and at
most its time while being strictly better on one of them. Those are the only sensible
choices; every other cell is beaten by one of them on both axes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..units import is_missing


def frontier(points: Iterable[tuple[str, float, float]]) -> list[str]:
    """Names of the non-dominated (name, memory, seconds) points, smallest memory first.

    Points with a missing (None or NaN) coordinate cannot be compared and are left out."""
    usable = [
        (name, memory, seconds) for name, memory, seconds in points
        if not is_missing(memory) and not is_missing(seconds)
    ]
    kept = [point for point in usable if not any(_dominates(other, point) for other in usable)]
    return [name for name, _, _ in sorted(kept, key=lambda point: (point[1], point[2], point[0]))]


def _dominates(a: Sequence, b: Sequence) -> bool:
    return a[1] <= b[1] and a[2] <= b[2] and (a[1] < b[1] or a[2] < b[2])
