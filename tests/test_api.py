"""The Python API: the same answers as the commands, one-line errors, notebook display."""

from __future__ import annotations

import inspect
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_RUN
from rich.console import Console
from typer.testing import CliRunner

import gputech_bench
from gputech_bench import UserError, compare, list_presets, list_strategies, load_run, run_matrix
from gputech_bench.api import Output
from gputech_bench.api._progress import MatrixProgress, NotebookProgress
from gputech_bench.api._setup import resolve_config
from gputech_bench.cli import app
from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.errors import ConfigError, StrategyError
from gputech_bench.report.export import render
from gputech_bench.results import CellResult
from gputech_bench.results import load_run as load_results

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "plots"


def quiet() -> Output:
    return Output(Console(file=io.StringIO()), Console(file=io.StringIO()))


# --------------------------------------------------------------------------- stability


def api_reference() -> str:
    """docs/api.md, the Python API's reference page (the README keeps a short example)."""
    return (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", gputech_bench.__all__)
def test_every_public_name_is_documented_with_an_example(name: str):
    assert re.search(rf"`{re.escape(name)}\b", api_reference()), f"docs/api.md does not name {name}"
    doc = inspect.getdoc(getattr(gputech_bench, name)) or ""
    assert "Example" in doc and ">>>" in doc, f"{name}'s docstring has no example"


def test_importing_the_package_stays_light():
    # Every worker imports gputech_bench: the API's imports (pandas, rich, torch) must wait for first use.
    code = ("import sys, gputech_bench; "
            "print([m for m in ('torch', 'pandas', 'rich', 'gputech_bench.api') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_functions_stay_functions_after_every_subpackage_is_imported():
    # No public name is also a subpackage's: importing the subpackages (as every worker does)
    # cannot rebind a function of the package, and nothing rewrites module classes to make it so.
    import gputech_bench
    import gputech_bench.estimator.predict  # noqa: F401
    import gputech_bench.strategies.sparse_head  # noqa: F401

    for name in ("estimate", "fit", "list_strategies", "list_presets", "run_matrix"):
        assert inspect.isfunction(getattr(gputech_bench, name)), name
    assert type(gputech_bench) is type(inspect) and type(gputech_bench.strategies) is type(inspect)
    assert "device_memory" in inspect.signature(gputech_bench.estimate).parameters
    assert "refused" in inspect.signature(list_strategies).parameters
    assert inspect.getdoc(gputech_bench.estimate).startswith("Predict each cell's peak memory")


# --------------------------------------------------------------------------- one-line errors


def test_a_user_error_is_one_line_in_ipython():
    code = "from gputech_bench import run_matrix; run_matrix(strategies=['no-such-cell'], preset='cpu', progress=False)"
    # IPython warns on stderr when VIRTUAL_ENV names another environment than the interpreter's
    # (a shell that activated a different venv): its own warning, not the error's lines.
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    out = subprocess.run([sys.executable, "-m", "IPython", "--colors=nocolor", "--no-banner", "-c", code],
                         capture_output=True, text=True, timeout=300, env=env)
    shown = (out.stdout + out.stderr).strip().splitlines()
    assert [line for line in shown if "no-such-cell" in line] == shown, shown
    assert len(shown) == 1 and shown[0].startswith("StrategyError: unknown strategy 'no-such-cell'"), shown
    assert UserError("x")._render_traceback_() == ["UserError: x"]


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"strategies": ["no-such-cell"]}, StrategyError, "unknown strategy 'no-such-cell'"),
    ({"strategies": [1]}, ConfigError, "cell names"),
    ({"strategies": []}, ConfigError, "is empty"),
    ({"overrides": {"train.bogus": 1}}, ConfigError, "unknown config key 'train.bogus'"),
    ({"overrides": {"train.max_steps": None}}, ConfigError, "overrides['train.max_steps']"),
    ({"overrides": "train.max_steps=4"}, ConfigError, "pass a dict"),
    ({"repeat": 0}, ConfigError, "--repeat 0"),
    ({"vary_seed": True}, ConfigError, "--vary-seed needs --repeat 2"),
    ({"gpus": "0"}, ConfigError, "--gpus needs CUDA"),
])
def test_bad_input_raises_one_line_before_anything_runs(tmp_path: Path, kwargs, error, fragment):
    options = {"strategies": ["1"], "preset": "cpu", "device": "cpu", "results": tmp_path / "r", "output": quiet()}
    with pytest.raises(error) as raised:
        run_matrix(**{**options, **kwargs})
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
    assert isinstance(raised.value, UserError)
    assert not (tmp_path / "r").exists()


def test_overrides_as_a_dict_resolve_as_the_same_set_strings():
    as_dict = resolve_config("cpu", {"train.max_steps": 4, "model.dropout": 0.0, "data.objective": "mlm",
                                     "memory_snapshot": False, "train.lr": 1e-4}, None, None, None, "cpu", quiet())
    as_set = apply_overrides(load_preset("cpu"), ["device=cpu", "train.max_steps=4", "model.dropout=0.0",
                                                  "data.objective=mlm", "memory_snapshot=false", "train.lr=1e-4"])
    assert as_dict == as_set


# --------------------------------------------------------------------------- runs, frames, display


@pytest.mark.parametrize("fixture", ["cpu", "cuda", "repeats"])
def test_a_loaded_run_is_the_frame_every_export_uses(fixture: str):
    run = load_run(FIXTURES / fixture, output=quiet())
    loaded = load_results(FIXTURES / fixture)
    assert run.frame.to_csv(index=False) == render(loaded, "csv")  # report.csv is this frame
    assert run.render("md") == render(loaded, "md") and run.render("json") == render(loaded, "json")
    frame = run.frame
    frame.loc[:, "memory_mib"] = 0.0  # a copy: changing it changes nothing the run shows or writes
    assert run.frame.to_csv(index=False) == render(loaded, "csv")
    assert run.cells == [result.cell for result in loaded.results]
    # In a notebook: the same table as the HTML report, from the same renderer.
    table = re.search(r"<table>.*?</table>", render(loaded, "html"), re.S).group(0)
    assert table in run._repr_html_() and "<style>" in run._repr_html_()
    assert "body {" not in run._repr_html_() and "h1 {" not in run._repr_html_()  # page styles stay out of a notebook


def test_the_run_prints_the_table_the_report_command_prints():
    # print(run) is plain text: the markdown `report --format md` prints (the terminal's rich
    # table is the command line's, cli/tables.py), then the cells' notes, as `run` prints them.
    run = load_run(FIXTURES / "cpu", output=quiet())
    printed = CliRunner().invoke(app, ["report", str(FIXTURES / "cpu"), "--format", "md"]).stdout
    printed_lines = [line.rstrip() for line in printed.rstrip("\n").splitlines()]
    assert [line.rstrip() for line in str(run).splitlines()][:len(printed_lines)] == printed_lines
    assert "4: " in "\n".join(str(run).splitlines()[len(printed_lines):])


def test_failed_cells_are_rows(tmp_path: Path):
    from helpers import cpu_run, write_run

    run = load_run(write_run(tmp_path / "run", cpu_run()), output=quiet())
    assert run.failed == {"4": "oom: CUDA out of memory"} and not run.ok
    row = run.frame.set_index("cell").loc["4"]
    assert row["status"] == "oom" and pd.isna(row["memory_mib"])
    assert 'class="failed"' in run._repr_html_()


def test_a_named_baseline_must_be_a_cell_and_without_one_ratios_are_empty(tmp_path: Path):
    from helpers import make_result, write_run

    with pytest.raises(ConfigError, match="baseline cell 'nope' is not in"):
        load_run(FIXTURES / "cpu", "nope", output=quiet())
    assert load_run(FIXTURES / "cpu", output=quiet()).with_baseline("4").frame.set_index("cell").loc["4", "memory_x_baseline"] == 1.0
    alone = load_run(write_run(tmp_path / "alone", [make_result("1", tracked_peak_mib=5.0, epoch_seconds=1.0)]),
                     output=quiet())
    assert alone.frame["memory_x_baseline"].isna().all()  # not measured against some other cell


def test_unreadable_files_are_warned_about_and_listed(tmp_path: Path):
    from helpers import cpu_run, write_run

    folder = write_run(tmp_path / "run", cpu_run())
    (folder / "stray.json").write_text("{broken")
    output = quiet()
    run = load_run(folder, output=output)
    assert run.problems and "stray.json" in run.problems[0]
    assert "warning:" in output.errors.file.getvalue() and "stray.json" in output.errors.file.getvalue()


def test_plots_come_back_as_figures():
    from matplotlib.figure import Figure

    run = load_run(FIXTURES / "repeats", output=quiet())
    assert all(isinstance(run.plot(kind), Figure) for kind in ("memory_vs_time", "memory_breakdown", "accuracy"))
    with pytest.raises(ConfigError, match="no accuracy plot"):
        load_run(FIXTURES / "cpu", output=quiet()).plot("accuracy")
    with pytest.raises(ConfigError, match="unknown plot"):
        run.plot("pie")


def test_a_loaded_run_reads_its_saved_estimate():
    assert load_run(FIXTURES / "cpu", output=quiet()).estimate is None
    estimate = load_run(FIXTURES / "cuda", output=quiet()).estimate
    assert estimate is not None and "measured_mib" in estimate.frame.columns
    assert "predicted" in str(estimate) or "tensor peak" in str(estimate)


def test_compare_is_the_command_s_comparison():
    diff = compare(FIXTURES / "cuda", FIXTURES / "cpu", output=quiet())
    assert diff.warnings and any("devices differ" in warning for warning in diff.warnings)
    frame = diff.frame
    assert list(frame["cell"]) == [cell.cell for cell in diff.comparison.cells]
    assert {"memory_mib_ratio", "epoch_seconds_verdict", "masked_accuracy_delta_points"} <= set(frame.columns)
    printed = CliRunner().invoke(app, ["compare", str(FIXTURES / "cuda"), str(FIXTURES / "cpu"), "--format", "md"]).stdout
    assert printed == diff.markdown()
    assert "warning:" in diff._repr_html_() and "B/A" in diff._repr_html_()


def test_compare_refuses_runs_with_no_cell_in_common(tmp_path: Path):
    from helpers import make_result, write_run

    other = write_run(tmp_path / "other", [make_result("amp", tracked_peak_mib=1.0)])
    with pytest.raises(ConfigError, match="no cell in common"):
        compare(other, write_run(tmp_path / "more", [make_result("lora", tracked_peak_mib=1.0)]), output=quiet())


def test_strategies_and_presets_are_what_the_commands_list():
    listed = list_strategies()
    printed = CliRunner().invoke(app, ["strategies"]).stdout
    from gputech_bench.strategies import registered

    assert listed["key"].tolist() == [cls.key for cls in registered()]
    for row in listed.itertuples(index=False):
        assert (row.key if row.key == row.name else f"{row.key}  {row.name}") in printed
    refused = list_strategies(refused=True)
    assert list(refused.columns) == ["combination", "reason"] and "4+amp" in refused["combination"].tolist()
    table = list_presets()
    cpu = table[table["preset"] == "cpu"].set_index("setting")
    assert cpu.loc["model.num_layers", "value"] == 2 and type(cpu.loc["model.num_layers", "value"]) is int
    assert cpu.loc["train.lr", "seed"] == 3e-05  # the seed's default, its own type kept
    assert table[table["preset"] == "seed"]["setting"].isna().all()  # the seed changes nothing
    printed = CliRunner().invoke(app, ["presets"]).stdout
    assert "    model.num_layers = 2  (seed: 12)" in printed


# --------------------------------------------------------------------------- progress


def test_progress_in_a_notebook_is_one_display_updated_in_place():
    shown: list[str] = []
    console = Console(file=io.StringIO(), force_jupyter=True, width=100)
    progress = MatrixProgress(2, console)
    assert isinstance(progress.progress, NotebookProgress)
    progress.progress._show = shown.append
    with progress:
        progress.cell_started(0, "baseline")
        for step in range(1, 50):  # a burst of step events: drawn at most every MIN_INTERVAL
            progress.event("baseline", {"event": "step", "step": step, "total": 50})
        progress.cell_finished(0, CellResult("baseline", "ok", None))
        progress.cell_started(1, "1")
        progress.cell_finished(1, CellResult("1", "timeout", "exceeded --cell-timeout of 1 s"))
    assert 2 <= len(shown) < 20
    assert "cells" in shown[-1] and "2/2" in re.sub(r"<[^>]+>", "", shown[-1])  # the end state stays


def test_progress_into_a_pipe_is_clean_lines():
    console = Console(file=io.StringIO(), width=100)  # not a terminal, not a notebook
    with MatrixProgress(1, console) as progress:
        progress.cell_started(0, "baseline")
        progress.event("baseline", {"event": "step", "step": 1, "total": 2})
        progress.cell_finished(0, CellResult("baseline", "ok", None))
    text = console.file.getvalue()
    assert "baseline: ok" in text and "\x1b[" not in text and "\r" not in text


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_run_matrix_runs_workers_and_returns_the_run(tmp_path: Path, cache_dir: Path):
    overrides = TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=3"]
    tiny = dict(item.split("=", 1) for item in overrides)
    run = run_matrix(strategies=["1"], preset="cpu", device="cpu", overrides=tiny, results=tmp_path, run_name="api",
                     progress=False, output=quiet())
    assert run.ok and run.cells == ["baseline", "1"] and run.path == tmp_path / "api"
    assert {path.name for path in run.exports} == {"report.md", "report.csv", "report.json"}
    assert run.frame.to_csv(index=False) == (tmp_path / "api" / "report.csv").read_text()
    assert run.estimate is not None and set(run.estimate.frame["cell"]) == {"baseline", "1"}
    assert load_run(run.path, output=quiet()).frame.equals(run.frame)
    # A cell that fails is a row, never an exception: here every worker outlives a 1 s timeout
    # (240 steps, seconds each cell; 3 steps in a forked worker can finish within the second).
    long_cells = {**tiny, "train.max_steps": "0", "train.epochs": "40"}
    stopped = run_matrix(strategies=["1"], preset="cpu", device="cpu", overrides=long_cells, results=tmp_path,
                         run_name="timeout", cell_timeout=1, estimate=False, progress=False, output=quiet())
    assert set(stopped.frame["status"]) == {"timeout"} and not stopped.ok and stopped.estimate is None
