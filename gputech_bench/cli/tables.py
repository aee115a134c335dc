"""The terminal tables: rich ``Table``s built from what the library layers computed.

In: the report's frame (``report.frame``) and its row texts (``report.table``), an
estimate (``estimate.render``), a comparison (``report.compare``). Out: ``rich.table.Table``
objects for ``common.print_table``. Only the presentation lives here (columns, colours,
markup); every figure's text comes from the library, so the markdown, HTML and these
tables show the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.markup import escape
from rich.table import Table

from ..metrics import EPOCH_SECONDS, EPOCH_X_BASELINE, MEMORY, MEMORY_X_BASELINE
from ..report.compare import Comparison, comparison_rows, headers
from ..report.frame import MemoryMeasure, accuracy_columns
from ..report.table import ALLOCATED_HEADER, allocated_text, extremes, reason_notes, row_texts, shows_allocated, table_notes
from ..results import TRAINED_STATUSES
from ..units import format_gib

if TYPE_CHECKING:
    from ..estimator.render import EstimateReport

# --------------------------------------------------------------------------- a run's results


def _styled(text: str, value: Any, best_worst: tuple[Any, Any]) -> str:
    best, worst = best_worst
    if best is not None and value == best:
        return f"[bold green]{text}[/]"
    if worst is not None and value == worst:
        return f"[red]{text}[/]"
    return text


def results_table(frame: pd.DataFrame, measure: MemoryMeasure, title: str = "gputech-bench") -> Table:
    """The terminal table of a run. A cell that is not ok shows its status and a footnote
    number; the reason is a note under the table (one per distinct reason), so that a long
    reason never sets the table's width. The status column is the only one that may fold:
    the helper that prints tables (common.print_table) keeps the others as wide as their
    widest figure."""
    table = Table(title=title, title_justify="left", caption_justify="left")
    table.add_column("cell", no_wrap=True)
    table.add_column(f"{measure.label}", justify="right")
    table.add_column("x base", justify="right")
    # On CUDA the memory column (NVML, or reserved) holds the allocator's caching: allocated beside it.
    allocated = shows_allocated(frame)
    if allocated:
        table.add_column(ALLOCATED_HEADER, justify="right")
    table.add_column("time / epoch", justify="right")
    table.add_column("x base", justify="right")
    accuracy = accuracy_columns(frame)
    table.add_column(accuracy.accuracy.shown_as.terminal, justify="right")
    table.add_column("Δ pts", justify="right")
    table.add_column(accuracy.second.shown_as.terminal, justify="right")
    table.add_column("status", overflow="fold")
    columns = (MEMORY.name, MEMORY_X_BASELINE.name, EPOCH_SECONDS.name, EPOCH_X_BASELINE.name, accuracy.accuracy.name,
               accuracy.delta.name, accuracy.second.name)
    best_worst = {column: extremes(frame, column) for column in columns}
    numbers, reasons = reason_notes(frame)
    for row in frame.itertuples(index=False):
        status = "[green]ok[/]" if row.status == "ok" else f"[bold red]{row.status}[/]"
        if (row.status, row.reason) in numbers:
            status += escape(f" [{numbers[row.status, row.reason]}]")
        if row.status not in TRAINED_STATUSES:
            table.add_row(row.cell, *["-"] * (8 if allocated else 7), status)
            continue
        styled = [_styled(text, getattr(row, column), best_worst[column])
                  for text, column in zip(row_texts(row, accuracy), columns)]
        if allocated:
            styled.insert(2, allocated_text(row))
        table.add_row(row.cell, *styled, status)
    table.caption = "\n".join(reasons + table_notes(frame)) or None
    return table


# --------------------------------------------------------------------------- an estimate


def _fits(value: bool | None) -> str:
    return "-" if value is None else ("[green]yes[/]" if value else "[red]no[/]")


def estimate_table(report: "EstimateReport", title: str = "gputech-bench estimate (MiB)") -> Table:
    """Every category, the overheads, the device total, and measured where known."""
    # Here, not at the top: the estimate's modules import torch, which 'report' and
    # 'compare' never need.
    from ..estimator.render import categories, has_source_column, row_cells, untraceable_row

    rows = report.rows()
    compared = any("measured_what" in row for row in rows)
    table = Table(title=title, title_justify="left")
    table.add_column("setup", style="bold", no_wrap=True)
    if has_source_column(report):  # traced or modelled, with the footnote that says how
        table.add_column("figure", no_wrap=True)
    for _, header in categories(report):
        table.add_column(header, justify="right")
    table.add_column("tensor peak", justify="right", style="bold")
    table.add_column("+reserve", justify="right")
    table.add_column("+context", justify="right")
    table.add_column("device", justify="right", style="bold")
    table.add_column("host", justify="right")
    if report.budget_bytes is not None:
        table.add_column(f"fits {format_gib(report.budget_bytes)}", justify="center")
    if compared:
        table.add_column("measured", justify="right")
        table.add_column("error", justify="right")
    for row in rows:
        if row["error"]:
            table.add_row(*untraceable_row(report, row, len(table.columns)))
            continue
        table.add_row(*row_cells(report, row, compared, _fits))
    return table


def compact_estimate_table(report: "EstimateReport", title: str) -> Table:
    """Predicted against measured only, for under ``run``'s table; ``estimate`` shows the categories."""
    from ..estimator.render import error_text, mib_text, source_text, untraceable_row  # torch: see estimate_table

    table = Table(title=title, title_justify="left")
    table.add_column("cell", style="bold", no_wrap=True)
    table.add_column("predicted", justify="right")
    table.add_column("host", justify="right")
    table.add_column("measured", justify="right")
    table.add_column("error", justify="right")
    for row in report.rows():
        if row["error"]:
            table.add_row(*untraceable_row(report, row, 5))
            continue
        measured = row.get("measured_mib")
        what = row.get("measured_what", "-")
        shown = mib_text(measured) if measured is not None else ("n/a" if "n/a" in what else what)
        label = f"{row['setup']} ({source_text(report, row)})" if row.get("modelled") else row["setup"]
        table.add_row(label, mib_text(row["tensor_peak_mib"]), mib_text(row["host_peak_mib"]), shown,
                      error_text(row.get("error_percent")))
    return table


# --------------------------------------------------------------------------- two runs


def comparison_table(comparison: Comparison) -> Table:
    table = Table(title=f"A = {comparison.name_a}, B = {comparison.name_b}", title_justify="left")
    names = headers(comparison)
    for index, header in enumerate(names):
        if index == 0:
            table.add_column(header, no_wrap=True)
        elif index == len(names) - 1:  # the verdict, in words: the one column a narrow terminal may fold
            table.add_column(header, overflow="fold")
        else:
            table.add_column(header, justify="right")
    for row in comparison_rows(comparison):
        table.add_row(*row)
    return table
