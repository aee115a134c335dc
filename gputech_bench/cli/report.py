"""``gputech-bench report`` and ``compare``: a saved run rendered again, or two runs side by side."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import typer

from ..api import compare as compare_runs
from ..api import load_run
from ..report.export import FORMATS
from .common import MORE_HINT, OutputConsole, console, emit, errors, fail, print_table
from .common import output as common_output
from .estimate import print_against_measured
from .tables import comparison_table, results_table

REPORT_HELP = """Render a run's table again from its saved results, plot it, or make one shareable HTML file.

**Examples**

* `gputech-bench report results/cpu-20261127-120000`
* `gputech-bench report results/RUN --format md --output table.md`
* `gputech-bench report results/RUN --format csv --baseline 1`
* `gputech-bench report results/RUN --plot plots/` - memory against time, where the memory goes, accuracy spread (PNG)
* `gputech-bench report results/RUN --format html --output report.html` - table, plots, provenance and config in one file
"""


def report(
    run_dir: Path = typer.Argument(..., help="A run folder made by 'gputech-bench run'."),
    format_: str = typer.Option("table", "--format", help="table, md, csv, json or html (html goes to RUN_DIR/report.html unless --output says where)."),
    output: Optional[Path] = typer.Option(None, help="Write to this file instead of the terminal."),
    baseline: str = typer.Option("baseline", help="The cell the x-baseline and difference columns compare against."),
    plot: Optional[Path] = typer.Option(None, help="Also write the plots as PNG files into this folder."),
) -> None:
    formats = ("table", *FORMATS)
    if format_ not in formats:
        fail(f"unknown format '{format_}': choose one of {', '.join(formats)}")
    try:
        run = load_run(run_dir, baseline, output=common_output())
    except ValueError as error:
        fail(str(error))
    if plot is not None:
        try:
            written = run.write_plots(plot)
        except OSError as error:
            fail(f"cannot write plots to '{plot}' ({error.strerror or error}): pass a writable --plot folder")
        console.print(f"plots: {', '.join(str(path) for path in written)}", highlight=False)
    missing = run.missing_line
    if format_ == "table":
        table = results_table(run.frame, run.measure, title=f"gputech-bench: {run.name}")
        if output is None:
            print_table(table, hint=MORE_HINT)
            if missing:
                console.print(missing, highlight=False)
            if run.estimate is not None:
                print_against_measured(run.estimate.report)
            return
        buffer = io.StringIO()
        print_table(table, out=OutputConsole(file=buffer, color_system=None))  # not a terminal: nothing wraps
        rendered = buffer.getvalue()
    else:
        rendered = run.render(format_)
    if format_ == "html" and output is None:
        output = run_dir / "report.html"
    emit(rendered, output)
    if missing:  # on stderr: the rendered table stays alone on stdout
        errors.print(missing, highlight=False, soft_wrap=True)


COMPARE_HELP = """Put two runs side by side, cell by cell: figures, ratios B/A, and what changed beyond noise.

Warns when the presets, the resolved configs or the devices differ, and says how. A change
is beyond noise when both runs repeated the cell (`run --repeat N`) and the ranges do not overlap.

**Examples**

* `gputech-bench compare results/a30-run results/h100-run` - one card against another
* `gputech-bench compare results/before results/after --format md --output upgrade.md` - a library upgrade
"""


def compare(
    run_a: Path = typer.Argument(..., help="The first run folder (A)."),
    run_b: Path = typer.Argument(..., help="The second run folder (B); ratios are B/A."),
    format_: str = typer.Option("table", "--format", help="table, md or json."),
    output: Optional[Path] = typer.Option(None, help="Write to this file instead of the terminal."),
) -> None:
    if format_ not in ("table", "md", "json"):
        fail(f"unknown format '{format_}': choose one of table, md, json")
    try:
        compared = compare_runs(run_a, run_b, output=common_output())
    except ValueError as error:
        fail(str(error))
    comparison = compared.comparison
    if format_ == "table" and output is None:
        for warning in comparison.warnings:
            errors.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        print_table(comparison_table(comparison), hint=MORE_HINT)
        for line in compared.footer():
            console.print(f"  [dim]{line}[/]", highlight=False)
        return
    text = json.dumps(compared.to_dict(), indent=2) + "\n" if format_ == "json" else compared.markdown()
    emit(text, output)
    if output is not None:  # on stdout, the markdown or JSON stays alone
        for warning in comparison.warnings:
            errors.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(help=REPORT_HELP)(report)
    app.command(help=COMPARE_HELP)(compare)
