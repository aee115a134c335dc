"""compare RUN_A RUN_B: cell by cell, ratios, noise, and the config differences named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import repeated

from gputech_bench.report.compare import compare_runs, comparison_markdown, config_differences
from gputech_bench.results import load_run, write_result
from gputech_bench.stats import HIGHER, SINGLE_RUN, WITHIN_NOISE

FIXTURE = Path(__file__).parent / "fixtures" / "plots" / "cpu"


def copy_run(tmp_path: Path, name: str, **config_changes: dict) -> Path:
    run = tmp_path / name
    shutil.copytree(FIXTURE, run)
    config = json.loads((run / "config.json").read_text())
    for section, values in config_changes.items():
        config[section].update(values)
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_a_config_difference_is_named_with_both_values(tmp_path: Path):
    a = copy_run(tmp_path, "before")
    b = copy_run(tmp_path, "after", train={"batch_size": 16}, data={"max_length": 64})
    comparison = compare_runs(load_run(a), load_run(b))
    (warning,) = [w for w in comparison.warnings if "configs differ" in w]
    assert "2 setting(s)" in warning
    assert "train.batch_size: 32 -> 16" in warning and "data.max_length: 32 -> 64" in warning
    assert "train.batch_size: 32 -> 16" in comparison_markdown(comparison)


def test_identical_configs_give_no_warning_and_single_runs_no_verdict(tmp_path: Path):
    comparison = compare_runs(load_run(copy_run(tmp_path, "a")), load_run(copy_run(tmp_path, "b")))
    assert comparison.warnings == ()
    baseline = comparison.cells[0]
    assert baseline.cell == "baseline"
    assert {change.verdict for change in baseline.changes} == {SINGLE_RUN}
    assert all(change.ratio == 1.0 for change in baseline.changes[:2])


def test_repeated_runs_say_what_changed_beyond_noise(tmp_path: Path):
    for name, seconds in (("a", [10.0, 10.2, 9.9]), ("b", [12.0, 12.3, 12.1])):
        run = tmp_path / name
        shutil.copy(FIXTURE / "config.json", run.mkdir() or run / "config.json")
        write_result(run / "baseline.json", repeated("baseline", seconds, 100.0, [0.05, 0.051, 0.052]))
    comparison = compare_runs(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    (cell,) = comparison.cells
    verdicts = {change.figure: change.verdict for change in cell.changes}
    assert verdicts == {"memory": WITHIN_NOISE, "time / epoch": HIGHER, "masked accuracy": WITHIN_NOISE}
    assert cell.beyond_noise == ["time / epoch higher"]
    assert round(cell.changes[1].ratio, 3) == round(12.1 / 10.0, 3)


def test_config_differences_walk_nested_settings():
    assert config_differences({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 2, "c": (1, 2)}}) == ["a.b: 1 -> 2"]
    assert config_differences({"x": 1}, {"x": 1, "y": 2}) == ["y: None -> 2"]
