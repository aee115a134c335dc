"""Statistics on hand-made samples: outliers by MAD, and "within noise" on constructed cases."""

from __future__ import annotations

import pytest

from gputech_bench.stats import HIGHER, LOWER, SINGLE_RUN, WITHIN_NOISE, modified_zscores, summarize, versus


def test_median_range_and_mad():
    summary = summarize([3.0, 1.0, 2.0, 10.0, 2.5])
    assert summary.median == 2.5
    assert (summary.minimum, summary.maximum, summary.spread) == (1.0, 10.0, 9.0)
    # deviations from 2.5: 0.5, 1.5, 0.5, 7.5, 0 -> median 0.5
    assert summary.mad == 0.5
    assert summarize([]) is None


@pytest.mark.parametrize("values, outliers", [
    ([7.0], ()),                                  # one value: nothing to stand out from
    ([100.0, 0.0], ()),                           # two values: each is as far from the median
    ([9.8, 10.0, 10.2], ()),                      # low variance
    ([9.8, 10.0, 10.2, 14.0], (3,)),              # 14 is 20 MADs away (the MAD is 0.2)
    ([1.00, 1.01, 0.99, 1.00, 1.60], (4,)),
    ([5.0] * 7 + [50.0], (7,)),                   # MAD 0: anything off the median is flagged
    ([5.0] * 6 + [50.0, 50.0], (6, 7)),
], ids=["one-value", "two-values", "low-variance", "one-far-of-four", "one-far-of-five", "mad-0", "mad-0-two-far"])
def test_outliers_are_flagged_by_their_modified_zscore(values, outliers):
    assert summarize(values).outliers == outliers


def test_modified_zscore_is_the_distance_in_mads():
    assert modified_zscores([1.0, 2.0, 3.0, 4.0, 5.0]) == [-2.0, -1.0, 0.0, 1.0, 2.0]


def test_clear_differences_and_noise():
    baseline = summarize([10.0, 10.4, 9.8, 10.1])
    assert versus(summarize([7.0, 7.2, 7.1]), baseline) == LOWER
    assert versus(summarize([12.0, 12.5, 11.9]), baseline) == HIGHER
    # 3% faster by the median, but the ranges overlap: not a finding.
    assert versus(summarize([9.7, 9.9, 10.3]), baseline) == WITHIN_NOISE
    # Identical deterministic figures (memory of a fixed-seed cell) are within noise of each other.
    assert versus(summarize([512.0, 512.0]), summarize([512.0, 512.0])) == WITHIN_NOISE
    assert versus(summarize([500.0, 500.0]), summarize([512.0, 512.0])) == LOWER


def test_an_outlier_does_not_blur_a_clear_difference():
    baseline = summarize([10.0, 10.1, 9.9, 10.0, 30.0])  # one run disturbed by another process
    assert baseline.outliers == (4,)
    assert versus(summarize([12.0, 12.1, 12.2, 11.9, 12.0]), baseline) == HIGHER


def test_one_run_has_no_spread_to_judge_against():
    assert versus(summarize([5.0]), summarize([6.0, 6.1])) == SINGLE_RUN
