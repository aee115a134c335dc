"""Two result sets side by side, cell by cell: an A30 against an H100, or a library
before and after an upgrade.

For each cell both runs hold: memory, time per epoch and the task's compared accuracy
metrics from each (a masked-LM's masked accuracy; a causal LM's next-token accuracy and
perplexity), the ratio B/A (points for an accuracy), and whether the change is beyond noise. Noise is judged
from the repeats' ranges when both runs repeated the cell (``run --repeat``); a single
run on either side cannot tell a change from noise, and the table says so instead of
guessing. Differences in preset or resolved config are reported first, key by key:
they are usually the reason for a change, or the reason a comparison is unfair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd

from ..config import config_changes
from ..metrics import EPOCH_SECONDS, MEMORY, PEAK_ALLOCATED, Metric, TaskMetrics
from ..measure.allocator import describe as describe_allocator
from ..results import CellResult, LoadedRun, cell_order
from ..stats import HIGHER, LOWER, SINGLE_RUN, WITHIN_NOISE, versus
from ..units import is_missing
from .frame import build_frame, results_metrics
from .table import fmt_figure, fmt_mib, fmt_seconds


@dataclass(frozen=True)
class ComparedFigure:
    """A figure compared between two runs: memory, time, and the task's compared accuracy metrics."""

    label: str  # its name in the table's verdicts and in the JSON
    abbreviation: str  # the headers' stem: "memory A", "memory B"
    column: str  # the frame's column
    #: The repeats' statistics it is judged by; None for the run's own memory measure.
    statistics: str | None
    #: The API frame's columns start with it (``memory_mib_a``, ``masked_accuracy_b``).
    prefix: str
    #: B-A in points (an accuracy) rather than B/A.
    in_points: bool
    text: Callable[[float], str]


MEMORY_FIGURE = ComparedFigure("memory", "memory", MEMORY.name, None, MEMORY.name, False, fmt_mib)
TIME_FIGURE = ComparedFigure("time / epoch", "time", EPOCH_SECONDS.name, EPOCH_SECONDS.name, EPOCH_SECONDS.name,
                             False, fmt_seconds)


#: Beside a CUDA run's memory (NVML or reserved, which hold the allocator's caching): the tensors' peak.
ALLOCATED_FIGURE = ComparedFigure("allocated", "alloc", PEAK_ALLOCATED.name, PEAK_ALLOCATED.name, PEAK_ALLOCATED.name,
                                  False, fmt_mib)


def _accuracy_figure(metric: Metric) -> ComparedFigure:
    labels = metric.shown_as
    return ComparedFigure(labels.long, labels.abbreviation, metric.name, metric.name, metric.stem, metric.is_fraction,
                          lambda value: fmt_figure(metric, value))


def compared_figures(accuracy: TaskMetrics, cuda: bool = False) -> tuple[ComparedFigure, ...]:
    """What a comparison of runs of ``accuracy``'s task shows, in column order; with ``cuda`` (a
    side ran on CUDA) the allocated peak beside the memory column."""
    return (MEMORY_FIGURE, *((ALLOCATED_FIGURE,) if cuda else ()), TIME_FIGURE,
            *(_accuracy_figure(metric) for metric in accuracy.compared))


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """'key: A -> B' for every setting that differs between two resolved configs."""
    return [f"{key}: {value_a!r} -> {value_b!r}" for key, value_a, value_b in config_changes(a, b)]


@dataclass(frozen=True)
class Change:
    compared: ComparedFigure
    a: float | None
    b: float | None
    verdict: str  # lower, higher, within noise, single run, or "-" when a side has no figure

    @property
    def figure(self) -> str:
        return self.compared.label

    @property
    def ratio(self) -> float | None:
        if self.a is None or self.b is None or self.a == 0:
            return None
        return self.b / self.a


@dataclass(frozen=True)
class CellComparison:
    cell: str
    status_a: str
    status_b: str
    changes: tuple[Change, ...]

    @property
    def beyond_noise(self) -> list[str]:
        return [f"{change.figure} {change.verdict}" for change in self.changes if change.verdict in (LOWER, HIGHER)]


@dataclass(frozen=True)
class Comparison:
    name_a: str
    name_b: str
    measure_a: str
    measure_b: str
    #: The figures each cell's changes hold, in order (run A's task decides the accuracy ones).
    figures: tuple[ComparedFigure, ...]
    warnings: tuple[str, ...]
    cells: tuple[CellComparison, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "gputech-bench/compare/1",
            "a": self.name_a, "b": self.name_b, "memory_a": self.measure_a, "memory_b": self.measure_b,
            "warnings": list(self.warnings), "only_in_a": list(self.only_a), "only_in_b": list(self.only_b),
            "cells": [
                {"cell": c.cell, "status_a": c.status_a, "status_b": c.status_b, "beyond_noise": c.beyond_noise,
                 "figures": [{"figure": ch.figure, "a": ch.a, "b": ch.b, "ratio_b_over_a": ch.ratio,
                              "verdict": ch.verdict} for ch in c.changes]}
                for c in self.cells
            ],
        }


def _value(frame: pd.DataFrame, cell: str, column: str) -> float | None:
    value = frame.loc[frame["cell"] == cell, column].iloc[0]
    return None if is_missing(value) else float(value)


def _verdict(result_a: CellResult, result_b: CellResult, key: str, a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    summary_a, summary_b = result_a.statistics(key), result_b.statistics(key)
    if summary_a is None or summary_b is None:
        return SINGLE_RUN
    return versus(summary_b, summary_a)


def _known(values: Iterable[str | None]) -> set[str]:
    return {value for value in values if value is not None}


def _warnings(run_a: LoadedRun, run_b: LoadedRun) -> list[str]:
    warnings = []
    presets = ({r.preset for r in run_a.results}, {r.preset for r in run_b.results})
    if presets[0] != presets[1]:
        warnings.append(f"presets differ: {', '.join(map(str, sorted(presets[0], key=str)))} -> "
                        f"{', '.join(map(str, sorted(presets[1], key=str)))}")
    objectives = [_known(r.objective for r in run.results) for run in (run_a, run_b)]
    if objectives[0] != objectives[1]:
        warnings.append(f"training objectives differ: {', '.join(sorted(objectives[0]))} -> "
                        f"{', '.join(sorted(objectives[1]))}, so their accuracies measure different things "
                        "(data.objective)")
    snapshots = [sorted(r.cell for r in run.results if r.recorded_snapshot) for run in (run_a, run_b)]
    if snapshots[0] != snapshots[1]:
        warnings.append("memory snapshots (--memory-snapshot) were recorded in "
                        f"{', '.join(snapshots[0]) or 'no cell'} -> {', '.join(snapshots[1]) or 'no cell'}: recording "
                        "slows every step, so those cells' times are not comparable")
    warnings += _allocator_warnings(run_a, run_b)
    if run_a.config is None or run_b.config is None:
        warnings.append("a run has no config.json: its settings cannot be compared")
    else:
        differences = config_differences(run_a.config, run_b.config)
        if differences:
            warnings.append(f"resolved configs differ in {len(differences)} setting(s): {'; '.join(differences[:8])}"
                            + ("; ..." if len(differences) > 8 else ""))
    devices = [_known((r.device or {}).get("name") or r.device_type for r in run.results) for run in (run_a, run_b)]
    if devices[0] != devices[1]:
        warnings.append(f"devices differ: {', '.join(sorted(devices[0]))} -> {', '.join(sorted(devices[1]))}")
    return warnings


def _allocator_warnings(run_a: LoadedRun, run_b: LoadedRun) -> list[str]:
    """The CUDA allocator's settings (PYTORCH_CUDA_ALLOC_CONF, run --allocator), when they differ
    between runs with CUDA cells: the reserved and NVML peaks hold the allocator's caching."""
    if not any(r.device_type == "cuda" for run in (run_a, run_b) for r in run.results):
        return []
    settings = [sorted({describe_allocator(r.allocator) for r in run.results}) for run in (run_a, run_b)]
    if settings[0] == settings[1]:
        return []
    return [f"allocator settings differ: {'; '.join(settings[0])} -> {'; '.join(settings[1])}: the allocator's "
            "caching differs, so compare reserved and NVML peaks with care and memory on allocated"]


def compare_runs(run_a: LoadedRun, run_b: LoadedRun) -> Comparison:
    frame_a, measure_a = build_frame(run_a.results)
    frame_b, measure_b = build_frame(run_b.results)
    warnings = _warnings(run_a, run_b)
    accuracy, accuracy_b = results_metrics(run_a.results), results_metrics(run_b.results)
    if accuracy != accuracy_b:
        warnings.append(f"the runs trained different tasks ({accuracy.task} -> {accuracy_b.task}): "
                        f"B's accuracy columns hold B's {accuracy.accuracy.shown_as.long}, which it never measured")
    figures = compared_figures(accuracy, any(r.device_type == "cuda" for run in (run_a, run_b) for r in run.results))
    if measure_a.metric != measure_b.metric:
        warnings.append(f"memory is measured differently ({measure_a.label} -> {measure_b.label}): "
                        "its ratio compares two different figures")
    by_cell_a, by_cell_b = run_a.by_cell(), run_b.by_cell()
    common = sorted(set(by_cell_a) & set(by_cell_b), key=cell_order)
    cells = []
    for cell in common:
        result_a, result_b = by_cell_a[cell], by_cell_b[cell]
        changes = []
        for figure in figures:
            a, b = _value(frame_a, cell, figure.column), _value(frame_b, cell, figure.column)
            key = figure.statistics or measure_a.metric
            changes.append(Change(figure, a, b, _verdict(result_a, result_b, key, a, b)))
        cells.append(CellComparison(cell, result_a.status, result_b.status, tuple(changes)))
    return Comparison(
        run_a.root.name, run_b.root.name, measure_a.label, measure_b.label, figures, tuple(warnings), tuple(cells),
        tuple(sorted(set(by_cell_a) - set(by_cell_b), key=cell_order)),
        tuple(sorted(set(by_cell_b) - set(by_cell_a), key=cell_order)),
    )


def describe_change(change: Change) -> str:
    """The B/A figure as the table shows it: a ratio, or points for accuracy."""
    if change.a is None or change.b is None:
        return "-"
    if change.compared.in_points:
        return f"{100 * (change.b - change.a):+.1f} pts"
    return "-" if change.ratio is None else f"{change.ratio:.2f}x"


VERDICT_TEXT = {LOWER: "lower", HIGHER: "higher", WITHIN_NOISE: "within noise", SINGLE_RUN: "single run", "-": "-"}


def _shown(change: Change) -> tuple[str, str]:
    a, b = ("-" if value is None else change.compared.text(value) for value in (change.a, change.b))
    return a, b


def _verdicts(cell: CellComparison) -> str:
    if cell.status_a != "ok" or cell.status_b != "ok":
        return f"status {cell.status_a} -> {cell.status_b}"
    verdicts = {change.verdict for change in cell.changes} - {"-"}
    if verdicts == {SINGLE_RUN}:
        return "? (no repeats)"
    return ", ".join(cell.beyond_noise) or "none"


def comparison_rows(comparison: Comparison) -> list[list[str]]:
    rows = []
    for cell in comparison.cells:
        row = [cell.cell]
        for change in cell.changes:
            row += [*_shown(change), describe_change(change)]
        rows.append(row + [_verdicts(cell)])
    return rows


def headers(comparison: Comparison) -> list[str]:
    # Short: the title names A and B, and a table of eleven columns must fit a terminal.
    columns = ["cell"]
    for figure in comparison.figures:
        columns += [f"{figure.abbreviation} A", f"{figure.abbreviation} B", "B-A" if figure.in_points else "B/A"]
    return columns + ["beyond noise"]


def comparison_markdown(comparison: Comparison) -> str:
    lines = [f"# {comparison.name_a} (A) against {comparison.name_b} (B)", ""]
    lines += [f"- **warning:** {warning}" for warning in comparison.warnings]
    lines += ["", "| " + " | ".join(headers(comparison)) + " |", "|" + "---|" * len(headers(comparison))]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(comparison)]
    lines += ["", *footer(comparison)]
    return "\n".join(lines) + "\n"


def footer(comparison: Comparison) -> list[str]:
    lines = [f"- memory: A {comparison.measure_a}, B {comparison.measure_b}; a change is beyond noise when the "
             "repeats' ranges (outliers left out) do not overlap; '?': a side ran once (no --repeat), so noise is unknown"]
    if comparison.only_a:
        lines.append(f"- only in A: {', '.join(comparison.only_a)}")
    if comparison.only_b:
        lines.append(f"- only in B: {', '.join(comparison.only_b)}")
    return lines
