"""Output that never hides a number: every table at 80 columns, narrower, and into a pipe.

Each table is printed through the helper every command uses (cli.common.print_table):
into a terminal of a given width (a Console that says it is one, without colour), and
into a pipe (a Console that is not a terminal, 80 columns as a pipe or a log gets). Every
figure of the JSON export, formatted as the table formats it, and every cell name must
then appear whole in its row: never elided, never wrapped across lines.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import cpu_run, make_result, write_run
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from gputech_bench.cli import app
from gputech_bench.cli.common import OutputConsole, print_table, wrap_text
from gputech_bench.cli.tables import compact_estimate_table, comparison_table, estimate_table, results_table
from gputech_bench.estimator.measured import measured_peak
from gputech_bench.estimator.render import SHOWN_CATEGORIES, from_dict
from gputech_bench.report.compare import compare_runs, comparison_rows
from gputech_bench.report.export import to_json
from gputech_bench.report.frame import build_frame
from gputech_bench.report.table import allocated_text, row_texts, shows_allocated
from gputech_bench.results import TRAINED_STATUSES, CellResult, load_run

FIXTURES = Path(__file__).parent / "fixtures" / "plots"
#: Terminal widths to render at; a negative one is a pipe of that width.
WIDTHS = (80, 60, 40, -80)


def rendered(table, width: int) -> str:
    """What print_table writes: into a terminal of ``width`` columns, or into a pipe."""
    out = OutputConsole(file=io.StringIO(), width=abs(width), force_terminal=width > 0, color_system=None)
    print_table(table, out=out)
    return out.file.getvalue()


def row_lines(text: str, name: str) -> list[str]:
    """The lines of ``text`` that are a row of ``name``: those that begin with it, past any box line."""
    return [line for line in text.splitlines()
            if re.match(rf"{re.escape(name)}(\s|$)", line.lstrip("│┃ "))]


def assert_whole(text: str, width: int, rows: dict[str, list[str]]) -> None:
    """Every figure of each row on one of that row's lines, whole; nothing past a terminal's edge."""
    for name, figures in rows.items():
        lines = row_lines(text, name)
        assert lines, f"row '{name}' is missing or its name is broken:\n{text}"
        joined = "\n".join(lines)
        for figure in figures:
            assert figure in joined, f"'{figure}' of row '{name}' is not whole at width {width}:\n{text}"
    if width > 0:
        too_wide = [line for line in text.splitlines() if cell_len(line) > width]
        assert not too_wide, f"lines past {width} columns:\n" + "\n".join(too_wide)
    else:
        # A pipe: the table at its natural width, so each row is exactly one line.
        for name in rows:
            assert len([line for line in row_lines(text, name) if line.startswith("│")]) == 1, text


def main_table_rows(results: list[CellResult]) -> dict[str, list[str]]:
    """Each cell's figures from the JSON export, formatted as the table formats them. (Its
    status is words: a narrow terminal may leave it out, and the note under the table says it.)"""
    frame, measure = build_frame(results)
    payload = json.loads(to_json(frame, measure, "baseline"))
    # A CUDA run's table shows the allocated peak beside its memory column: it must be whole too.
    cuda = shows_allocated(frame)
    return {row["cell"]: (list(row_texts(SimpleNamespace(**row)))
                          + ([allocated_text(SimpleNamespace(**row))] if cuda else [])
                          if row["status"] in TRAINED_STATUSES else [])
            for row in payload["rows"]}


def failing_run() -> list[CellResult]:
    """Ok, failed and eval-oom cells with long reasons, and figures wide enough to crowd 80 columns."""
    results = cpu_run() + [
        make_result("1+2+3", tracked_peak_mib=12_345.6, epoch_seconds=1234.5, eval_masked_accuracy=0.391,
                    eval_token_accuracy=0.881),
        make_result("1+2+4", status="eval-oom", tracked_peak_mib=21.6, epoch_seconds=75.3),
        make_result("checkpointing+accumulation", status="error", tracked_peak_mib=1.0),
    ]
    results[-1].reason = "RuntimeError: " + "a reason long enough to make any table far wider than a terminal " * 3
    results[-2].reason = "CUDA out of memory during evaluation: tried to allocate 2.30 GiB"
    return results


MAIN_RUNS = {
    "cpu fixture": lambda: load_run(FIXTURES / "cpu").results,
    "cuda fixture": lambda: load_run(FIXTURES / "cuda").results,
    "repeats fixture": lambda: load_run(FIXTURES / "repeats").results,
    "failures": failing_run,
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("run", MAIN_RUNS)
def test_the_run_and_report_table_keeps_every_figure_whole(run: str, width: int):
    results = MAIN_RUNS[run]()
    frame, measure = build_frame(results)
    text = rendered(results_table(frame, measure, title="gputech-bench: test"), width)
    assert_whole(text, width, main_table_rows(results))
    assert "…" not in text


def test_a_failed_cells_reason_is_a_note_under_the_table_whole():
    frame, measure = build_frame(failing_run())
    text = rendered(results_table(frame, measure), -80)
    assert "[1] oom in 4: CUDA out of memory" in text
    assert "[2] eval-oom in 1+2+4: CUDA out of memory during evaluation: tried to allocate 2.30 GiB" in text
    assert "[3] error in checkpointing+accumulation: RuntimeError: a reason long enough" in text
    # The reason is not in the table, so the table stays narrow: its widest line is a row, not a reason.
    table_lines = [line for line in text.splitlines() if line.startswith(("│", "┃", "┏", "└"))]
    assert max(cell_len(line) for line in table_lines) < 160


def test_a_narrow_terminal_says_what_it_folded_or_left_out():
    frame, measure = build_frame(failing_run())
    table = results_table(frame, measure)
    assert "narrow terminal" not in rendered(table, 200)
    assert "narrow terminal" not in rendered(table, -40)  # a pipe never narrows
    narrow = re.sub(r"\n +", " ", rendered(table, 60))
    assert "narrow terminal (60 columns):" in narrow and "a wider terminal shows everything" in narrow


def estimate_report():
    run = load_run(FIXTURES / "cuda")
    report = from_dict(json.loads((FIXTURES / "cuda" / "estimate.json").read_text()))
    by_cell = run.by_cell()
    measured = {p.setup.cell: measured_peak(by_cell.get(p.setup.cell)) for p in report.predictions}
    return dataclasses.replace(report, measured=measured, budget_bytes=24 * 2**30)


def mib(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


@pytest.mark.parametrize("width", WIDTHS)
def test_the_estimate_tables_keep_every_figure_whole(width: int):
    report = estimate_report()
    rows = report.to_dict()["rows"]
    full = {}
    compact = {}
    for row in rows:
        figures = [mib(row[f"{category}_mib"]) for category, _ in SHOWN_CATEGORIES]
        figures += [mib(row[key]) for key in ("tensor_peak_mib", "allocator_reserve_mib", "cuda_context_mib",
                                              "device_total_mib", "host_peak_mib", "measured_mib")]
        figures.append(f"{row['error_percent']:+.1f}%")
        full[row["setup"]] = figures + ["yes" if row["fits"] else "no"]
        compact[row["setup"]] = [mib(row["tensor_peak_mib"]), mib(row["host_peak_mib"]), mib(row["measured_mib"]),
                                 f"{row['error_percent']:+.1f}%"]
    text = rendered(estimate_table(report), width)
    assert_whole(text, width, full)
    assert "fits 24.0 GiB" in text or re.search(r"fits\s.*\n.*24\.0 GiB", text), text  # the budget never parts from its unit
    assert_whole(rendered(compact_estimate_table(report, "predicted against measured"), width), width, compact)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("runs", [("cpu", "repeats"), ("causal", "causal")])  # a causal LM's adds perplexity
def test_the_compare_table_keeps_every_figure_whole(width: int, runs: tuple[str, str]):
    comparison = compare_runs(*(load_run(FIXTURES / run) for run in runs))
    figures = comparison.to_dict()["cells"]
    assert [cell["cell"] for cell in figures] == [row[0] for row in comparison_rows(comparison)]
    # The verdict is words (it may fold in a narrow terminal); the rest are figures.
    rows = {row[0]: row[1:-1] + ([row[-1]] if width < 0 else []) for row in comparison_rows(comparison)}
    text = rendered(comparison_table(comparison), width)
    assert_whole(text, width, rows)


def test_figures_in_prose_keep_their_unit_when_a_terminal_wraps():
    line = Text("  the most frugal setup, 1+2+3 (micro 8), needs 12.34 GiB and 689 s per epoch")
    for width in range(20, 80):
        lines = [part.plain for part in wrap_text(line, width)]
        assert " ".join(part.strip() for part in lines) == line.plain.strip()
        assert all(cell_len(part) <= width for part in lines)
        assert not any(part.rstrip().endswith(("12.34", "689")) for part in lines), lines
    out = OutputConsole(file=io.StringIO(), width=30, color_system=None)  # a pipe: never wrapped
    out.print(line.plain)
    assert out.file.getvalue() == line.plain + "\n"


@pytest.fixture()
def columns_80(monkeypatch):
    """A pipe of 80 columns, whatever COLUMNS said when the console was made."""
    from gputech_bench.cli import common

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(common.console, "_width", None)


def strategies_output() -> str:
    result = CliRunner().invoke(app, ["strategies"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_strategies_read_at_80_columns_without_a_word_split(columns_80):
    from gputech_bench.cli.catalog import refused_pairs
    from gputech_bench.strategies import registered

    text = strategies_output()
    assert all(cell_len(line) <= 80 for line in text.splitlines()), text
    headings = {line.strip() for line in text.splitlines() if line and not line.startswith(" ")}
    # Every word of every field is whole: the text, its lines joined again, is the strategy's own.
    flowing = re.sub(r"\n +", " ", text)
    for cls in registered():
        assert (cls.key if cls.key == cls.name else f"{cls.key}  {cls.name}") in headings
        for field in (cls.saves, cls.costs, cls.gives_up or "nothing", cls.requires or "-"):
            assert field in flowing, f"'{field}' is broken:\n{text}"
    for name, reason in refused_pairs():
        assert f"{name}: {reason}" in flowing
    # The heading claims no cause: a refusal by 'incompatible' is not two strategies owning a hook.
    assert "own the same hook" not in text
    assert "refused combinations" in text


@pytest.mark.parametrize("fmt", ["xml", "html"])
def test_run_refuses_an_unknown_format_before_any_cell(tmp_path: Path, fmt: str):
    result = CliRunner().invoke(app, ["run", "--strategies", "1", "--preset", "cpu", "--device", "cpu",
                                      "--format", fmt, "--results", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"unknown --format '{fmt}'" in lines[0] and "table, md, csv, json" in lines[0]
    assert not (tmp_path / "results").exists()


def test_report_piped_and_into_a_file_is_never_wrapped(tmp_path: Path, columns_80):
    run_dir = write_run(tmp_path / "run", failing_run())
    rows = main_table_rows(failing_run())
    piped = CliRunner().invoke(app, ["report", str(run_dir)])
    assert piped.exit_code == 0, piped.output
    assert_whole(piped.stdout, -80, rows)
    assert "narrow terminal" not in piped.stdout
    out = CliRunner().invoke(app, ["report", str(run_dir), "--output", str(tmp_path / "table.txt")])
    assert out.exit_code == 0, out.output
    assert_whole((tmp_path / "table.txt").read_text(), -80, rows)


def test_a_plain_rich_console_at_80_columns_would_cut_the_figures():
    """The failure this file guards against, shown on rich's own rendering (no helper)."""
    results = failing_run()
    frame, measure = build_frame(results)
    out = Console(file=io.StringIO(), width=80, color_system=None)
    out.print(results_table(frame, measure))
    with pytest.raises(AssertionError):
        assert_whole(out.file.getvalue(), 80, main_table_rows(results))
