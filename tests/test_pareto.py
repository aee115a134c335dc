"""The Pareto frontier of memory against time, on hand-made points."""

from __future__ import annotations

import math

from gputech_bench.report.pareto import frontier


def test_dominated_cells_leave_the_frontier_and_it_runs_from_smallest_to_fastest():
    points = [
        ("baseline", 100.0, 10.0),
        ("1", 60.0, 13.0),
        ("4", 50.0, 40.0),
        ("1+2+4", 20.0, 45.0),
        ("3", 95.0, 10.0),  # beats the baseline on memory at the same time
        ("slow-and-big", 120.0, 50.0),
        ("amp", 70.0, 8.0),
    ]
    assert frontier(points) == ["1+2+4", "4", "1", "amp"]


def test_ties_keep_both_and_missing_coordinates_are_left_out():
    points = [("a", 10.0, 5.0), ("b", 10.0, 5.0), ("failed", None, 1.0), ("nan", math.nan, 0.1)]
    assert frontier(points) == ["a", "b"]
    assert frontier([]) == []
