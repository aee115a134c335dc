"""Expanding --matrix and --strategies into cells, and refusing bad ones before anything runs."""

from __future__ import annotations

import pytest

from gputech_bench.config import BenchConfig, apply_overrides
from gputech_bench.errors import StrategyError
from gputech_bench.run.matrix import REFERENCE_MATRIX, expand

CONFIG = BenchConfig()


def test_matrix_is_the_seeds_eight_cells_in_the_seeds_order():
    assert expand(None, True, CONFIG) == ["baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora"]
    assert tuple(expand(None, True, CONFIG)) == REFERENCE_MATRIX


def test_no_selection_means_the_matrix():
    assert expand(None, False, CONFIG) == list(REFERENCE_MATRIX)


@pytest.mark.parametrize(
    "text, cells",
    [
        ("1,3,1+2+3", ["baseline", "1", "3", "1+2+3"]),
        ("3", ["baseline", "3"]),
        ("checkpointing+accumulation", ["baseline", "1+2"]),
        ("adam8bit, mixed-precision", ["baseline", "3", "4"]),
        ("2+1, 1+2", ["baseline", "1+2"]),  # the same cell twice runs once
        ("baseline,lora", ["baseline", "lora"]),
        ("3+4", ["baseline", "3+4"]),
    ],
    ids=["numbers", "one", "names", "names-with-spaces", "same-cell-twice", "baseline-named", "pair"],
)
def test_strategies_always_include_the_baseline(text, cells):
    assert expand(text, False, CONFIG) == cells


def test_matrix_and_strategies_together_add_cells_to_the_matrix():
    assert expand("3+4", True, CONFIG) == [*REFERENCE_MATRIX, "3+4"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("9", "unknown strategy '9'"),
        ("1++2", "malformed combination '1++2'"),
        ("+3", "malformed combination '+3'"),
        ("1,,3", "has an empty entry"),
        ("", "--strategies is empty"),
        ("1+1", "appears twice"),
        ("flash", "unknown strategy 'flash'"),
    ],
    ids=["unknown", "double-plus", "leading-plus", "empty-entry", "empty", "twice", "unknown-name"],
)
def test_bad_cells_are_refused(text, message):
    with pytest.raises(StrategyError, match=message.replace("+", r"\+").replace("(", r"\(")):
        expand(text, False, CONFIG)


def test_a_cell_the_config_rules_out_is_refused_with_the_fix():
    config = apply_overrides(CONFIG, ["strategy.micro_batch_size=5"])
    with pytest.raises(StrategyError, match=r"refused cell '1\+2': strategy 2 needs strategy.micro_batch_size \(5\)"):
        expand("1+2", False, config)
