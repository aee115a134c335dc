"""``gputech-bench report`` and ``compare``: a saved run rendered again, or two runs side by side."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import ResultError
from ..results import load_run
from .common import MORE_HINT, OutputConsole, console, emit, errors, fail, print_table
from .estimate import show_saved_estimate

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
    from ..report.export import FORMATS, render
    from ..report.frame import build_frame
    from .tables import results_table

    formats = ("table", *FORMATS)
    if format_ not in formats:
        fail(f"unknown format '{format_}': choose one of {', '.join(formats)}")
    try:
        loaded = load_run(run_dir)
    except ResultError as error:
        fail(str(error))
    for problem in loaded.problems:
        errors.print(f"[yellow]warning:[/] {problem}", highlight=False, soft_wrap=True)
    cells = [result.cell for result in loaded.results]
    if baseline not in cells:
        fail(f"baseline cell '{baseline}' is not in {run_dir}: choose one of {', '.join(cells)}")
    if plot is not None:
        from ..report.plots import write_plots

        try:
            written = write_plots(loaded, plot, baseline)
        except OSError as error:
            fail(f"cannot write plots to '{plot}' ({error.strerror or error}): pass a writable --plot folder")
        console.print(f"plots: {', '.join(str(path) for path in written)}", highlight=False)
    if format_ == "table":
        frame, measure = build_frame(loaded.results, baseline)
        table = results_table(frame, measure, title=f"gputech-bench: {loaded.root.name}")
        if output is None:
            print_table(table, hint=MORE_HINT)
            show_saved_estimate(loaded)
            return
        capture = OutputConsole(file=io.StringIO(), color_system=None)  # not a terminal: nothing wraps
        print_table(table, out=capture)
        rendered = capture.file.getvalue()
    else:
        rendered = render(loaded, format_, baseline)
    if format_ == "html" and output is None:
        output = run_dir / "report.html"
    emit(rendered, output)


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
    from ..report.compare import compare_runs, comparison_markdown, footer
    from .tables import comparison_table

    if format_ not in ("table", "md", "json"):
        fail(f"unknown format '{format_}': choose one of table, md, json")
    try:
        loaded = [load_run(run_dir) for run_dir in (run_a, run_b)]
    except ResultError as error:
        fail(str(error))
    comparison = compare_runs(*loaded)
    if not comparison.cells:
        fail(f"{run_a} and {run_b} have no cell in common: compare runs of the same strategies")
    if format_ == "table" and output is None:
        for warning in comparison.warnings:
            errors.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        print_table(comparison_table(comparison), hint=MORE_HINT)
        for line in footer(comparison):
            console.print(f"  [dim]{line.removeprefix('- ')}[/]", highlight=False)
        return
    text = json.dumps(comparison.to_dict(), indent=2) + "\n" if format_ == "json" else comparison_markdown(comparison)
    emit(text, output)
    if output is not None:  # on stdout, the markdown or JSON stays alone
        for warning in comparison.warnings:
            errors.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)




def register(app: typer.Typer) -> None:
    app.command(help=REPORT_HELP)(report)
    app.command(help=COMPARE_HELP)(compare)
