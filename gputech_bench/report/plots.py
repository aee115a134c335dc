"""Plots of one run: memory against time per epoch, where the memory goes, accuracy over repeats.

Each chart is a ``matplotlib.figure.Figure`` on its own Agg canvas, never pyplot: no
global state, no display, and the HTML report can embed the same charts as PNG bytes.
The chart size is fixed (no ``bbox_inches="tight"``) so every PNG is FIGSIZE x DPI pixels.

Here matplotlib's Figure is called a chart (``Chart``, ``*_chart``): in this package a
figure is a measured value (``results.Figure``), and one name should mean one thing.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as Chart
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from ..estimator.render import EstimateReport, read_estimate
from ..files import atomic_write_bytes
from ..metrics import (
    ACTIVATIONS,
    EPOCH_SECONDS,
    EPOCH_TIME_EXTRAPOLATED,
    GRADIENTS,
    MEMORY,
    MEMORY_CATEGORIES,
    NVML_PROCESS_PEAK,
    OPTIMIZER_STATE,
    OTHER,
    PARAMETERS,
    PEAK_ALLOCATED,
    PEAK_RESERVED,
    QUANTIZED_WEIGHTS,
    TEMPORARIES,
    Metric,
)
from ..results import CellResult, LoadedRun, RunFolder
from ..units import MIB, MIB_PER_GIB, is_missing
from .frame import MemoryMeasure, build_frame, results_metrics
from .table import fmt_seconds

FIGSIZE = (10.0, 6.0)
DPI = 100  # with FIGSIZE: 1000 x 600 pixels

MEMORY_TIME_PNG = "memory_vs_time.png"
BREAKDOWN_PNG = "memory_breakdown.png"
ACCURACY_PNG = "accuracy.png"

# Okabe-Ito: eight colours told apart with every common colour-vision deficiency.
BLUE, SKY, GREEN, ORANGE, YELLOW, VERMILLION, PURPLE, GREY = (
    "#0072B2", "#56B4E9", "#009E73", "#E69F00", "#F0E442", "#D55E00", "#CC79A7", "#999999",
)

#: Okabe-Ito's blue, darkened: a ninth colour that reads as "parameters, but different".
NAVY = "#003A63"

#: Each memory category's colour in the stack.
CATEGORY_COLOURS = {
    PARAMETERS.name: BLUE,
    # qlora's frozen base: parameters too, so the same hue, darker.
    QUANTIZED_WEIGHTS.name: NAVY,
    GRADIENTS.name: SKY,
    OPTIMIZER_STATE.name: GREEN,
    ACTIVATIONS.name: ORANGE,
    TEMPORARIES.name: YELLOW,
    OTHER.name: PURPLE,
}
#: What CUDA holds beyond live tensors, stacked on top of them.
OVERHEAD_SEGMENTS = (
    ("cuda_context", "CUDA context\n(NVML - reserved)", GREY),
    ("allocator_reserve", "allocator reserve\n(reserved - allocated)", VERMILLION),
)
#: Stacked segments, bottom to top, with their legend names and colours: the memory categories
#: in the catalogue's order (buffers, which have no label of their own, fold into "other").
SEGMENTS = (
    *((category.name, category.chart_label, CATEGORY_COLOURS[category.name])
      for category in MEMORY_CATEGORIES if category.chart_label is not None),
    *OVERHEAD_SEGMENTS,
)
#: The categories drawn as they are; the rest fold into "other".
TENSOR_CATEGORIES = tuple(category.name for category in MEMORY_CATEGORIES
                          if category.chart_label is not None and category is not OTHER)
FOLDED_INTO_OTHER = tuple(category.name for category in MEMORY_CATEGORIES if category.chart_label is None)
OVERHEADS = tuple(key for key, _, _ in OVERHEAD_SEGMENTS)

MEASURED = "measured (MemTracker)"
ESTIMATED = "estimate (fake-tensor trace)"
SOURCE_LEGEND = {MEASURED: "source: measured\n(MemTracker)", ESTIMATED: "source: estimate\n(fake-tensor trace)"}

# The axes leave the right quarter of the chart to the legend, so no legend covers data.
AXES_BOX = dict(left=0.08, right=0.74, top=0.88, bottom=0.12)
LEGEND_AT: dict[str, Any] = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9)


def _new_chart() -> Chart:
    chart = Chart(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(chart)
    return chart


def png_bytes(chart: Chart) -> bytes:
    """The chart as PNG bytes, for a file or a base64 ``<img>``."""
    buffer = io.BytesIO()
    chart.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _memory_unit(largest_mib: float) -> tuple[str, float]:
    """GiB once the largest value reaches 1 GiB, MiB below; returns (unit, divisor)."""
    return ("GiB", float(MIB_PER_GIB)) if largest_mib >= MIB_PER_GIB else ("MiB", 1.0)


# --------------------------------------------------------------------------- label placement

#: Directions a label may take from its point (points; text aligned away from the point),
#: tried near first, then further out with a leader line.
_DIRECTIONS = ((7, 5), (7, -5), (-7, 5), (-7, -5), (0, 9), (0, -9), (10, 0), (-10, 0))
_DISTANCES = (1.0, 2.2, 3.6)
_ALIGN = {1: "left", 0: "center", -1: "right"}
_VALIGN = {1: "bottom", 0: "center", -1: "top"}


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def _overlap(box: Bbox, others: list[Bbox]) -> float:
    area = 0.0
    for other in others:
        common = Bbox.intersection(box, other)
        if common is not None:
            area += common.width * common.height
    return area


def _outside(box: Bbox, frame: Bbox) -> float:
    common = Bbox.intersection(box, frame)
    inside = 0.0 if common is None else common.width * common.height
    return box.width * box.height - inside


def _place_labels(ax, labels: list[tuple[str, tuple[float, float], Any]], obstacles: list[Bbox]) -> None:
    """Annotate each (text, xy, transform) at the first spot that overlaps nothing placed so far,
    no marker and nothing outside the axes; failing that, at the least crowded spot tried."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = list(obstacles)
    for text, xy, transform in labels:
        best = None
        for distance in _DISTANCES:
            for dx, dy in _DIRECTIONS:
                offset = (dx * distance, dy * distance)
                leader = dict(arrowstyle="-", color=GREY, lw=0.6, shrinkA=0, shrinkB=3) if distance > 1 else None
                note = ax.annotate(
                    text, xy, xycoords=transform, xytext=offset, textcoords="offset points", fontsize=8,
                    ha=_ALIGN[_sign(dx)], va=_VALIGN[_sign(dy)], arrowprops=leader, annotation_clip=False,
                )
                # The text alone (an Annotation's own extent includes its leader, which starts at
                # the point), once the annotation has turned its offset into a position.
                note.update_positions(renderer)
                box = Text.get_window_extent(note, renderer).padded(2)  # a gap between neighbours
                cost = _overlap(box, taken) + 4 * _outside(box, frame)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, note, box)
                else:
                    note.remove()
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None  # the first spot tried is the best so far
        taken.append(best[2])


def _cell_ticks(ax, labels: list[str]) -> None:
    """One tick per cell; slanted, with a deeper bottom margin, when neighbouring names would touch."""
    ax.set_xticks(range(len(labels)))
    texts = ax.set_xticklabels(labels, fontsize=9)
    renderer = ax.figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer).padded(3) for text in texts]
    if any(Bbox.intersection(a, b) is not None for a, b in zip(boxes[:-1], boxes[1:])):
        ax.set_xticklabels(labels, fontsize=9, rotation=30, ha="right", rotation_mode="anchor")
        ax.figure.subplots_adjust(bottom=0.2)


def _marker_boxes(points: list[tuple[float, float]], transform, half: float = 5.0) -> list[Bbox]:
    """Pixel boxes around markers, which labels must not cover."""
    boxes = []
    for point in points:
        x, y = transform.transform(point)
        boxes.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return boxes


# --------------------------------------------------------------------------- 1. memory against time


#: Share of the axes height kept at the top for cells that have no point to plot.
_FAILED_BAND = 0.12


def memory_time_chart(frame: pd.DataFrame, measure: MemoryMeasure, baseline: str = "baseline",
                      run_name: str | None = None) -> Chart:
    """Memory against time per epoch, one point per cell, the Pareto frontier as a step line.

    Cells without both figures (failed, or not measured) sit as crosses in a band along
    the top edge, labelled with their status, so a failure is seen and never plotted as 0."""
    chart = _new_chart()
    ax = chart.add_subplot()
    chart.subplots_adjust(**AXES_BOX)
    memory, seconds = MEMORY.name, EPOCH_SECONDS.name
    plotted = frame[frame[memory].notna() & frame[seconds].notna()]
    missing = frame[~frame.index.isin(plotted.index)]
    unit, divisor = _memory_unit(plotted[memory].max() if not plotted.empty else 0.0)
    xs = plotted[seconds].to_numpy()
    ys = (plotted[memory] / divisor).to_numpy()

    top = (ys.max() if len(ys) else 1.0) * 1.12
    if not missing.empty:
        top /= 1 - _FAILED_BAND  # room above the data for the band of crosses
    ax.set_xlim(0, (xs.max() if len(xs) else 1.0) * 1.12)
    ax.set_ylim(0, top)

    handles = _cell_points(ax, xs, ys, plotted["pareto"].eq(True).to_numpy(),
                           plotted[EPOCH_TIME_EXTRAPOLATED.name].eq(True).to_numpy())
    obstacles = _marker_boxes(list(zip(xs, ys)), ax.transData)
    obstacles += _frontier_line(ax, plotted[plotted["pareto"].eq(True)], divisor, handles)
    obstacles += _baseline_lines(ax, plotted, baseline, divisor, unit, handles)
    labels = [(cell, (x, y), ax.transData) for cell, x, y in zip(plotted["cell"], xs, ys)]
    if not missing.empty:
        obstacles += _failed_band(ax, missing, labels, handles)
    _place_labels(ax, labels, obstacles)

    ax.set_xlabel("time per epoch (s)")
    ax.set_ylabel(f"{measure.label} ({unit})")
    ax.set_title("Memory against time per epoch" + (f": {run_name}" if run_name else "") +
                 "\nlower left is better", fontsize=11)
    ax.grid(True, color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    ax.legend(handles=handles, **LEGEND_AT)
    return chart


def _cell_points(ax, xs, ys, on_frontier, extrapolated) -> list:
    """The cells' points, frontier cells in their own colour, hollow where the time was
    extrapolated; returns their legend handles."""
    handles = []
    for frontier_group, colour, name in ((False, BLUE, "cell"), (True, VERMILLION, "cell on the Pareto frontier")):
        chosen = on_frontier == frontier_group
        if not chosen.any():
            continue
        filled, hollow = chosen & ~extrapolated, chosen & extrapolated
        ax.scatter(xs[filled], ys[filled], s=40, color=colour, zorder=3)
        ax.scatter(xs[hollow], ys[hollow], s=40, facecolors="none", edgecolors=colour, linewidths=1.5, zorder=3)
        handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=name))
    if extrapolated.any():
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="black",
                              label="epoch time extrapolated\n(short run)"))
    return handles


def _frontier_line(ax, rows: pd.DataFrame, divisor: float, handles: list) -> list[Bbox]:
    """The frontier as a staircase: each frontier cell's dominated region starts at its step.
    Its segments are returned as obstacles so that no label is written across the line."""
    if len(rows) < 2:
        return []
    rows = rows.sort_values(EPOCH_SECONDS.name)
    xs, ys = rows[EPOCH_SECONDS.name].tolist(), (rows[MEMORY.name] / divisor).tolist()
    ax.step(xs, ys, where="post", color=VERMILLION, lw=1.2, zorder=2)
    handles.append(Line2D([], [], color=VERMILLION, lw=1.2, label="Pareto frontier\n(no cell smaller and faster)"))
    corners = [(x, y) for index in range(len(xs) - 1) for x, y in ((xs[index], ys[index]), (xs[index + 1], ys[index]))]
    corners.append((xs[-1], ys[-1]))
    display = ax.transData.transform(corners)
    return [Bbox.from_extents(min(a[0], b[0]) - 2, min(a[1], b[1]) - 2, max(a[0], b[0]) + 2, max(a[1], b[1]) + 2)
            for a, b in zip(display[:-1], display[1:])]


def _baseline_lines(ax, plotted: pd.DataFrame, baseline: str, divisor: float, unit: str, handles: list) -> list[Bbox]:
    """Dashed lines through the baseline's memory and time; their tags are obstacles for labels."""
    rows = plotted[plotted["cell"] == baseline]
    if rows.empty:
        return []
    row = rows.iloc[0]
    memory, seconds = row[MEMORY.name] / divisor, row[EPOCH_SECONDS.name]
    style: dict[str, Any] = dict(color="#555555", linestyle="--", lw=1.0, zorder=1)
    ax.axhline(memory, **style)
    ax.axvline(seconds, **style)
    handles.append(Line2D([], [], label=f"{baseline}: {memory:,.1f} {unit}, {fmt_seconds(seconds)}", **style))
    tags = [
        ax.text(1.0, memory, "baseline ", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=8, color="#555555"),
        ax.text(seconds, 0.0, " baseline", transform=ax.get_xaxis_transform(), ha="right", va="bottom",
                rotation=90, fontsize=8, color="#555555"),
    ]
    renderer = ax.figure.canvas.get_renderer()
    return [tag.get_window_extent(renderer) for tag in tags]


def _failed_band(ax, missing: pd.DataFrame, labels: list, handles: list) -> list[Bbox]:
    """A shaded band along the top edge with one cross per cell that has no point."""
    ax.add_patch(Rectangle((0, 1 - _FAILED_BAND), 1, _FAILED_BAND, transform=ax.transAxes, color="#f2f2f2", zorder=0))
    title = ax.text(0.005, 0.995, "no figures:", transform=ax.transAxes, ha="left", va="top", fontsize=8, color="#555555")
    count = len(missing)
    points = []
    for index, row in enumerate(missing.itertuples()):
        xy = (0.14 + 0.8 * (index + 0.5) / count, 1 - _FAILED_BAND / 2)
        ax.scatter(*xy, marker="x", s=50, color=VERMILLION, transform=ax.transAxes, zorder=3, clip_on=False)
        status = row.status if row.status != "ok" else "no memory or time figure"
        labels.append((f"{row.cell}: {status}", xy, ax.transAxes))
        points.append(xy)
    handles.append(Line2D([], [], marker="x", linestyle="", color=VERMILLION, label="cell without figures\n(failed or not measured)"))
    return [title.get_window_extent(ax.figure.canvas.get_renderer()), *_marker_boxes(points, ax.transAxes)]


# --------------------------------------------------------------------------- 2. where the memory goes


@dataclass(frozen=True)
class Stack:
    """One cell's bar: MiB per segment (SEGMENTS keys) on the device and, when it keeps some, the host."""

    cell: str
    status: str
    source: str  # MEASURED or ESTIMATED
    device: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    #: The run's headline memory figure for the cell, to compare the bar against; NaN when none.
    measure_mib: float = math.nan


def load_estimate(folder: RunFolder) -> EstimateReport | None:
    """The run folder's saved estimate, or None when there is none or it cannot be read."""
    try:
        return read_estimate(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _categories(values: dict[str, float]) -> dict[str, float]:
    """The shown categories from a full set: buffers and other folded together, zeros dropped."""
    folded = {name: values.get(name) or 0.0 for name in TENSOR_CATEGORIES}
    folded[OTHER.name] = sum(values.get(name) or 0.0 for name in (*FOLDED_INTO_OTHER, OTHER.name))
    return {name: value for name, value in folded.items() if value > 0}


def _tracked(row: pd.Series, side: str) -> dict[str, float] | None:
    values = {name: row.get(f"tracked_{side}_{name}_mib") for name in (*TENSOR_CATEGORIES, *FOLDED_INTO_OTHER, OTHER.name)}
    if all(is_missing(value) for value in values.values()):
        return None
    return _categories({name: value for name, value in values.items() if not is_missing(value)})


def _prediction(report: EstimateReport, cell: str, micro_batch_size: int | None):
    """The traced setup that matches how the run trained the cell (its micro-batch size), if any."""
    for prediction in report.predictions:
        if prediction.setup.cell != cell or prediction.error:
            continue
        if micro_batch_size is None or prediction.setup.micro_batch_size in (None, micro_batch_size):
            return prediction
    return None


def _overheads(row: pd.Series) -> dict[str, float]:
    """What CUDA holds beyond live tensors, from the run's own allocator and NVML figures."""
    overheads = {}
    allocated, reserved, nvml = (row.get(metric.name) for metric in (PEAK_ALLOCATED, PEAK_RESERVED, NVML_PROCESS_PEAK))
    if not is_missing(nvml) and not is_missing(reserved) and nvml > reserved:
        overheads["cuda_context"] = nvml - reserved
    if not is_missing(reserved) and not is_missing(allocated) and reserved > allocated:
        overheads["allocator_reserve"] = reserved - allocated
    return overheads


def breakdown_stacks(run: LoadedRun, frame: pd.DataFrame) -> tuple[list[Stack], list[str]]:
    """Each cell's stack, from its tracked categories or else from the run's estimate, and the
    cells with neither (named with their status)."""
    report = load_estimate(run.folder)
    micro_batch_size = ((run.config or {}).get("strategy") or {}).get("micro_batch_size")
    stacks, skipped = [], []
    for _, row in frame.iterrows():
        device, host, source = _tracked(row, "device"), _tracked(row, "host"), MEASURED
        if device is None:
            prediction = None if report is None else _prediction(report, row["cell"], micro_batch_size)
            if prediction is None:
                skipped.append(row["cell"] if row["status"] == "ok" else f"{row['cell']} ({row['status']})")
                continue
            device = _categories({name: value / MIB for name, value in prediction.device.by_category.items()})
            host = None if prediction.host is None else _categories(
                {name: value / MIB for name, value in prediction.host.by_category.items()})
            source = ESTIMATED
        device.update(_overheads(row))
        stacks.append(Stack(row["cell"], row["status"], source, device, host or {}, row[MEMORY.name]))
    return stacks, skipped


def memory_breakdown_chart(run: LoadedRun, frame: pd.DataFrame, measure: MemoryMeasure) -> Chart:
    """A stacked bar per cell of where its peak memory goes; host memory (strategy 4's fp32
    master and optimizer) as a lighter bar beside, estimated bars hatched."""
    chart = _new_chart()
    ax = chart.add_subplot()
    chart.subplots_adjust(**AXES_BOX)
    stacks, skipped = breakdown_stacks(run, frame)
    totals = [sum(stack.device.values()) for stack in stacks] + [sum(stack.host.values()) for stack in stacks]
    totals += [stack.measure_mib for stack in stacks if not is_missing(stack.measure_mib)]
    unit, divisor = _memory_unit(max(totals, default=0.0))

    used = set()
    for position, stack in enumerate(stacks):
        hatch = "//" if stack.source == ESTIMATED else None
        width = 0.38 if stack.host else 0.7
        centre = position - 0.2 if stack.host else position
        used |= _draw_bar(ax, centre, width, stack.device, divisor, hatch, alpha=1.0)
        if not is_missing(stack.measure_mib):
            ax.hlines(stack.measure_mib / divisor, centre - width / 2, centre + width / 2, colors="black", lw=2, zorder=4)
        if stack.host:
            used |= _draw_bar(ax, position + 0.2, width, stack.host, divisor, hatch, alpha=0.45)
            top = sum(stack.host.values()) / divisor
            ax.text(position + 0.2, top, "host", ha="center", va="bottom", fontsize=8, color="#555555")

    _cell_ticks(ax, [stack.cell if stack.status == "ok" else f"{stack.cell}\n({stack.status})" for stack in stacks])
    ax.set_xlim(-0.6, max(len(stacks), 1) - 0.4)
    ax.set_ylim(0, max(totals, default=1.0) / divisor * 1.1)
    ax.set_ylabel(f"peak memory ({unit})")
    overheads = ", plus what CUDA holds beyond them" if used & set(OVERHEADS) else ""
    ax.set_title(f"Where the memory goes, per cell: {run.root.name}\n"
                 f"live tensors at the peak of one optimizer step{overheads}", fontsize=11)
    ax.grid(True, axis="y", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    if skipped:
        note = f"not shown (no tracked figures and no estimate): {', '.join(skipped)}"
        chart.text(0.08, 0.01, textwrap.fill(note, 150), fontsize=8, color="#555555", va="bottom")
    ax.legend(handles=_breakdown_legend(stacks, used, measure), **LEGEND_AT)
    return chart


def _draw_bar(ax, centre: float, width: float, segments: dict[str, float], divisor: float, hatch: str | None,
              alpha: float) -> set[str]:
    """One stacked bar in SEGMENTS order; returns the segments it drew, for the legend."""
    bottom = 0.0
    for key, _, colour in SEGMENTS:
        value = segments.get(key, 0.0) / divisor
        if value <= 0:
            continue
        # CUDA's overheads always come from the run's own figures, so they are never hatched.
        hatched = hatch if key not in OVERHEADS else None
        ax.bar(centre, value, width, bottom=bottom, color=colour, alpha=alpha, hatch=hatched,
               edgecolor="white" if hatched is None else "black", linewidth=0.5)
        bottom += value
    return {key for key, value in segments.items() if value > 0}


def _breakdown_legend(stacks: list[Stack], used: set[str], measure: MemoryMeasure) -> list:
    handles: list = [Patch(color=colour, label=name) for key, name, colour in reversed(SEGMENTS) if key in used]
    sources = {stack.source for stack in stacks}
    if MEASURED in sources:
        handles.append(Patch(facecolor="white", edgecolor="black", label=SOURCE_LEGEND[MEASURED]))
    if ESTIMATED in sources:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=SOURCE_LEGEND[ESTIMATED]))
    if any(stack.host for stack in stacks):
        handles.append(Patch(facecolor=GREY, alpha=0.45, label="host side (lighter bar)"))
    if any(not is_missing(stack.measure_mib) for stack in stacks):
        handles.append(Line2D([], [], color="black", lw=2, label=f"run's figure:\n{measure.label}"))
    return handles


# --------------------------------------------------------------------------- 3. accuracy over repeats

#: Vertical room between stacked panels (a causal LM's accuracy above its perplexity).
_PANEL_SPACE = 0.55


def _repeat_statistics(result: CellResult, metric: Metric) -> dict[str, Any] | None:
    """``metric``'s statistics over the cell's repeats; None when it was not repeated."""
    statistics = (result.repeats or {}).get("statistics", {}).get(metric.name)
    return statistics if statistics and statistics.get("values") else None


def _repeated_cells(run: LoadedRun, frame: pd.DataFrame, metric: Metric) -> list[tuple[str, str, dict[str, Any]]]:
    by_cell = run.by_cell()
    return [(cell, status, statistics) for cell, status in zip(frame["cell"], frame["status"])
            if (statistics := _repeat_statistics(by_cell[cell], metric)) is not None]


def accuracy_chart(run: LoadedRun, frame: pd.DataFrame) -> Chart | None:
    """The task's compared accuracy metrics over repeats (a masked-LM's masked accuracy; a causal
    LM's next-token accuracy above its perplexity): per repeated cell the median, min-max bars and
    every value as a dot; None when no cell was repeated."""
    accuracy = results_metrics(run.results)
    panels = [(metric, cells) for metric in accuracy.compared if (cells := _repeated_cells(run, frame, metric))]
    if not panels:
        return None
    chart = _new_chart()
    axes = [chart.add_subplot(len(panels), 1, index + 1) for index in range(len(panels))]
    chart.subplots_adjust(**AXES_BOX, **({"hspace": _PANEL_SPACE} if len(panels) > 1 else {}))
    any_outlier = False
    for ax, (metric, cells) in zip(axes, panels):
        any_outlier |= _repeats_panel(ax, metric, cells)
    by_cell = run.by_cell()
    varied = any((by_cell[cell].repeats or {}).get("vary_seed") for _, cells in panels for cell, _, _ in cells)
    seeds = "a different seed per repeat" if varied else "the same seed each repeat: run-to-run noise only"
    axes[0].set_title(f"{accuracy.repeats_title}: {run.root.name}\n{seeds}", fontsize=11)
    handles = [
        Line2D([], [], marker="o", color=BLUE, lw=1.5, label="median; bar: min to max"),
        Line2D([], [], marker="o", linestyle="", color=GREY, markersize=4, label="one repeat"),
    ]
    if any_outlier:
        handles.append(Line2D([], [], marker="x", linestyle="", color=VERMILLION, label="outlier (MAD rule)"))
    axes[0].legend(handles=handles, **LEGEND_AT)
    return chart


def _repeats_panel(ax, metric: Metric, cells: list[tuple[str, str, dict[str, Any]]]) -> bool:
    """One metric's medians, ranges and values per cell; returns whether any value is an outlier."""
    scale = 100 if metric.is_fraction else 1  # a fraction is drawn in percent
    any_outlier = False
    for position, (_, _, statistics) in enumerate(cells):
        median, low, high = (scale * statistics[key] for key in ("median", "min", "max"))
        ax.errorbar(position, median, yerr=[[median - low], [high - median]], fmt="o", color=BLUE,
                    markersize=7, capsize=6, lw=1.5, zorder=3)
        values, outliers = statistics["values"], set(statistics.get("outliers", []))
        # The dots sit to the right of the bar, spread sideways so equal values stay visible.
        xs = [position + 0.15 + 0.1 * index / max(len(values) - 1, 1) for index in range(len(values))]
        kept = [index for index in range(len(values)) if index not in outliers]
        ax.scatter([xs[i] for i in kept], [scale * values[i] for i in kept], s=14, color=GREY, zorder=2)
        if outliers:
            any_outlier = True
            ax.scatter([xs[i] for i in outliers], [scale * values[i] for i in outliers], s=30, marker="x",
                       color=VERMILLION, zorder=2)
    _cell_ticks(ax, [f"{cell}\n(n={len(statistics['values'])}{'' if status == 'ok' else ', ' + status})"
                     for cell, status, statistics in cells])
    ax.set_xlim(-0.6, len(cells) - 0.2)
    ax.set_ylabel(metric.shown_as.axis)
    ax.grid(True, axis="y", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    return any_outlier


# --------------------------------------------------------------------------- files


def run_charts(run: LoadedRun, baseline: str = "baseline") -> dict[str, Chart]:
    """The run's charts by file name; the accuracy chart only when cells were repeated."""
    frame, measure = build_frame(run.results, baseline)
    charts = {
        MEMORY_TIME_PNG: memory_time_chart(frame, measure, baseline, run_name=run.root.name),
        BREAKDOWN_PNG: memory_breakdown_chart(run, frame, measure),
        ACCURACY_PNG: accuracy_chart(run, frame),
    }
    return {name: chart for name, chart in charts.items() if chart is not None}


def write_plots(run: LoadedRun, out_dir: Path, baseline: str = "baseline") -> list[Path]:
    """Write the run's plots as PNG files into out_dir (created if missing); return their paths."""
    out_dir = Path(out_dir)
    written = []
    for name, chart in run_charts(run, baseline).items():
        path = out_dir / name
        atomic_write_bytes(path, png_bytes(chart))
        written.append(path)
    return written
