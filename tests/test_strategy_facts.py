"""A strategy is one file: it declares its facts, registration refuses one left out, and a new
strategy module alone reaches the listing, the estimate, fit's search, a run's table and the docs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN, NoOpFacts, assert_one_line_error, gputech

from gputech_bench.errors import StrategyDeclarationError
from gputech_bench.strategies import Strategy, register, registered
from gputech_bench.strategies.adam8bit import Adam8bit
from gputech_bench.strategies.discovery import STRATEGY_MODULES_VARIABLE
from gputech_bench.strategies.facts import FACTS, NOT_ESTIMATED, EstimateKind, StateLocation, TimeFactor

ROOT = Path(__file__).resolve().parents[1]

#: A new strategy, one module: a no-op with a time factor of its own.
NOOP_MODULE = '''
from gputech_bench.strategies import Strategy, register
from gputech_bench.strategies.facts import TRACED, StateLocation, TimeFactor


@register
class NoopTest(Strategy):
    key = "noop-test"
    name = "noop-test"
    saves = "nothing: a strategy written for a test"
    costs = "nothing"
    order = 96
    time_factor = TimeFactor(0.9, "reasoned: a test's made-up figure")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
'''


def _facts_of(cls: type) -> dict[str, object]:
    return {fact.name: getattr(cls, fact.name) for fact in FACTS}


def _declaring(**body: object) -> type:
    return type("Declared", (Strategy,), {"key": "test-facts", "name": "test-facts", "saves": "-", "costs": "-",
                                         "order": 94, **body})


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("left_out", [fact.name for fact in FACTS])
def test_a_strategy_that_leaves_a_fact_out_is_refused_with_the_fact_named(left_out: str):
    facts = {name: value for name, value in _facts_of(NoOpFacts).items() if name != left_out}
    with pytest.raises(StrategyDeclarationError) as error:
        register(_declaring(**facts))
    message = str(error.value)
    assert message.startswith(f"strategy 'test-facts' (Declared) does not declare {left_out}: ") and "\n" not in message
    assert "test-facts" not in {cls.key for cls in registered()}


@pytest.mark.parametrize("fact, value, fragment", [
    ("time_factor", 1.0, "expected a TimeFactor"),
    ("time_factor", TimeFactor(1.0, ""), "name its source"),
    ("time_factor", TimeFactor(0.0, "free"), "free of time"),
    ("trains_adapters", "no", "expected True or False"),
    ("state_location", "device", "expected a StateLocation"),
    ("libraries", "bitsandbytes", "expected a tuple of names"),
    ("micro_batch_counts", (1, 4), "micro-batch counts of 2 or more"),
    ("estimate", "traced", "expected TRACED"),
])
def test_a_fact_of_the_wrong_kind_is_refused_with_the_fact_named(fact: str, value: object, fragment: str):
    with pytest.raises(StrategyDeclarationError, match=f"declares {fact} wrongly: .*{fragment}"):
        register(_declaring(**{**_facts_of(NoOpFacts), fact: value}))


def test_a_strategy_cannot_inherit_another_strategys_facts():
    # paged-adam8bit subclasses adam8bit, and declares its facts again: inherited, its state
    # would silently live on the device.
    class Sub(Adam8bit):
        key = name = "test-sub"

    with pytest.raises(StrategyDeclarationError, match=r"'test-sub' \(Sub\) does not declare time_factor \(only Adam8bit"):
        register(Sub)


def test_an_untraceable_strategy_says_how_the_estimate_handles_it():
    with pytest.raises(StrategyDeclarationError, match="declares estimate TRACED but untraceable says why"):
        register(_declaring(**_facts_of(NoOpFacts), untraceable="data-dependent"))
    with pytest.raises(StrategyDeclarationError, match="no untraceable reason"):
        register(_declaring(**{**_facts_of(NoOpFacts), "estimate": NOT_ESTIMATED}))


def test_every_registered_strategy_declares_its_facts_and_each_modeller_exists():
    from gputech_bench.estimator.modelled import MODELLERS

    for cls in registered():
        assert cls.time_factor.source
        if cls.estimate.kind is EstimateKind.MODELLED:
            assert cls.estimate.modeller in MODELLERS, cls.key
    assert {cls.key for cls in registered() if cls.state_location is StateLocation.HOST} == {"4", "fsdp-offload"}
    assert [cls.key for cls in registered() if cls.micro_batch_counts] == ["2"]


def test_no_module_outside_strategies_compares_a_strategy_key():
    """Facts live on the strategy: no key literal in a comparison, a membership test or a
    table's keys outside strategies/ (the reference matrix in config.py is the exception)."""
    keys = {cls.key for cls in registered()} | {cls.name for cls in registered()}
    found = []
    for path in sorted((ROOT / "gputech_bench").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("gputech_bench/strategies/") or relative == "gputech_bench/config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                literals = [operand for operand in [node.left, *node.comparators]
                            for operand in ([operand] if not isinstance(operand, (ast.Tuple, ast.Set, ast.List))
                                            else operand.elts)]
            elif isinstance(node, ast.Dict):
                literals = [key for key in node.keys if key is not None]
            else:
                continue
            found += [f"{relative}:{node.lineno} {literal.value!r}" for literal in literals
                      if isinstance(literal, ast.Constant) and literal.value in keys]
    assert found == []


# --------------------------------------------------------------------------- the docs


def test_the_docs_listing_is_the_registrys():
    from gputech_bench.api._catalog import strategies_markdown

    page = (ROOT / "docs" / "strategies.md").read_text()
    assert strategies_markdown() in page, (
        "docs/strategies.md's listing differs from the registry: replace it with the output of "
        "'gputech-bench strategies --markdown'"
    )


# --------------------------------------------------------------------------- a new strategy, one file


def _with_module(path: Path) -> dict[str, str]:
    return {STRATEGY_MODULES_VARIABLE: str(path)}


def test_a_new_strategy_module_alone_reaches_every_reader(tmp_path: Path, cache_dir: Path):
    module = tmp_path / "noop_test.py"
    module.write_text(NOOP_MODULE)
    env = _with_module(module)

    listed = gputech("strategies", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "noop-test" in listed.stdout and "x0.90 (reasoned: a test's made-up figure)" in listed.stdout
    docs = gputech("strategies", "--markdown", cwd=tmp_path, env=env)
    assert "| `noop-test` | `noop-test` | x0.90 | reasoned: a test's made-up figure | device | traced | - |" in docs.stdout

    overrides = sum((["--set", o] for o in [*TINY_RUN, f"data.cache_dir={cache_dir}"]), [])
    estimated = gputech("estimate", "--strategies", "noop-test", "--preset", "cpu", "--jobs", "1", *overrides,
                        "--format", "json", cwd=tmp_path, env=env)
    assert estimated.returncode == 0, estimated.stderr
    rows = {row["cell"]: row for row in json.loads(estimated.stdout)["rows"]}
    assert rows["noop-test"]["source"] == "traced" and rows["noop-test"]["parameters_mib"] > 0

    # fit's search: a candidate, alone and combined, priced by its own time factor.
    code = (
        "from gputech_bench.config import BenchConfig; from gputech_bench.estimator.fit import candidates, "
        "modelled_factor; import json; config = BenchConfig(); "
        "print(json.dumps({s.label: modelled_factor(s, config) for s in candidates(config) if 'noop-test' in s.cell}))"
    )
    searched = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env={**os.environ, **env})
    assert searched.returncode == 0, searched.stderr
    factors = json.loads(searched.stdout.splitlines()[-1])
    assert factors["noop-test"] == pytest.approx(0.9) and factors["1+noop-test"] == pytest.approx(4 / 3 * 0.9)

    ran = gputech("run", "--strategies", "noop-test", "--preset", "cpu", "--no-estimate", *overrides,
                  "--set", "train.max_steps=3", "--results", str(tmp_path / "results"), "--run-name", "noop",
                  cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    table_rows = [line for line in ran.stdout.splitlines() if line.lstrip("│| ").startswith("noop-test")]
    assert table_rows and "ok" in table_rows[0], ran.stdout


def test_a_module_that_leaves_a_fact_out_is_one_line_naming_it(tmp_path: Path):
    module = tmp_path / "missing.py"
    module.write_text(NOOP_MODULE.replace('    time_factor = TimeFactor(0.9, "reasoned: a test\'s made-up figure")\n', ""))
    out = gputech("strategies", cwd=tmp_path, env=_with_module(module))
    assert_one_line_error(out.returncode, out.stderr, str(module), "strategy 'noop-test' (NoopTest) does not declare time_factor")


@pytest.mark.parametrize("name, text, fragment", [
    ("absent.py", None, "which is not a .py file"),
    ("broken.py", "import no_such_library_here\n", "failed to import: ModuleNotFoundError: No module named"),
])
def test_a_bad_strategy_module_path_is_one_line(tmp_path: Path, name: str, text: str | None, fragment: str):
    module = tmp_path / name
    if text is not None:
        module.write_text(text)
    out = gputech("strategies", cwd=tmp_path, env=_with_module(module))
    assert_one_line_error(out.returncode, out.stderr, STRATEGY_MODULES_VARIABLE, str(module), fragment)
