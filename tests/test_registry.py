"""Strategy names, combinations and refusals."""

from __future__ import annotations

import pytest
from helpers import NoOpFacts, context, tiny_bert

from gputech_bench.errors import StrategyError
from gputech_bench.strategies import (
    Placement,
    Strategy,
    build_plan,
    combination_refusal,
    parse_cell,
    register,
    registered,
    unregister,
)


def test_the_reference_strategies_keep_their_numbers_and_every_strategy_resolves_by_key_and_name():
    # The reference study's four keep the numbers its table used; the rest are found by
    # discovery, so a new strategy file is not listed here (its facts are checked at registration).
    by_key = {cls.key: cls for cls in registered()}
    assert [(key, by_key[key].name) for key in ("1", "2", "3", "4")] == [
        ("1", "checkpointing"), ("2", "accumulation"), ("3", "adam8bit"), ("4", "mixed-precision")]
    assert {"fsdp-offload", "paged-adam8bit", "lora", "qlora", "amp", "amp-fp16", "sparse-head", "compile"} <= set(by_key)
    orders = [cls.order for cls in registered()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    for cls in registered():
        assert parse_cell(cls.key).strategies == parse_cell(cls.name.upper()).strategies == (cls,)
        assert cls.saves and cls.costs


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("baseline", "baseline"),
        ("1", "1"),
        ("3+2+1", "1+2+3"),
        ("checkpointing+accumulation", "1+2"),
        (" Checkpointing + 4 ", "1+4"),
        ("LORA", "lora"),
        ("1+2+4", "1+2+4"),
    ],
)
def test_cells_parse_to_a_canonical_name(text, canonical):
    assert parse_cell(text).name == canonical


@pytest.mark.parametrize(
    "text, message",
    [
        ("9", "unknown strategy '9'"),
        ("1++2", "malformed combination '1++2'"),
        ("+3", "malformed combination '+3'"),
        ("3+", "malformed combination '3+'"),
        ("1+1", "appears twice"),
        ("1+checkpointing", "appears twice"),
        ("baseline+1", "'baseline' cannot be combined"),
        ("", "empty strategy name"),
    ],
    ids=["unknown", "double-plus", "leading-plus", "trailing-plus", "twice", "twice-by-name", "baseline-combined", "empty"],
)
def test_malformed_cells_are_refused_in_one_line(text, message):
    with pytest.raises(StrategyError) as error:
        parse_cell(text)
    assert message in str(error.value) and "\n" not in str(error.value)


class _HostPlacement(NoOpFacts, Strategy):
    """A stand-in strategy that, like strategy 4, decides where the weights live."""

    key = "test-host"
    name = "test-host-placement"
    saves = costs = "nothing (test double)"
    order = 99

    def placement(self, model, ctx) -> Placement:  # pragma: no cover - never built
        raise AssertionError


def test_two_owners_of_one_hook_are_refused_before_anything_runs():
    register(_HostPlacement)
    try:
        cell = parse_cell("4+test-host")
        assert "'4' and 'test-host' both own the placement hook" in combination_refusal(cell)
        with pytest.raises(StrategyError, match="refused combination"):
            build_plan(cell, tiny_bert(), context())
    finally:
        unregister(_HostPlacement)


def test_claims_come_from_the_overridden_hooks():
    by_key = {cls.key: cls() for cls in registered()}
    assert by_key["1"].claims() == set()
    assert by_key["2"].claims() == {"split_batch"}
    assert by_key["3"].claims() == {"build_optimizer"}
    assert by_key["4"].claims() == {"placement"}
    assert by_key["lora"].claims() == set()
    assert by_key["amp"].claims() == by_key["amp-fp16"].claims() == {"precision"}
    assert by_key["paged-adam8bit"].claims() == {"build_optimizer"}
    assert by_key["fsdp-offload"].claims() == {"placement"}
    assert by_key["sparse-head"].claims() == by_key["compile"].claims() == set()


def test_a_strategy_that_cannot_run_with_the_config_is_refused_with_the_fix():
    with pytest.raises(StrategyError, match="micro_batch_size \\(5\\) to divide train.batch_size \\(32\\)"):
        build_plan(parse_cell("2"), tiny_bert(), context("strategy.micro_batch_size=5"))
