"""The frame as people read it: each figure as text, markdown, and the notes under every table.

The terminal table (``cli.tables``) and the HTML report take their figures' text from here.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..config import ATTENTION_KERNELS, OBJECTIVES
from ..measure.allocator import NOT_RECORDED, caching_note
from ..results import TRAINED_STATUSES, CellResult
from ..stats import WITHIN_NOISE
from ..units import MIB, MIB_PER_GIB, format_gib, format_size, is_missing
from ..metrics import (
    CAUSAL_LM,
    EPOCH_SECONDS,
    EPOCH_TIME_EXTRAPOLATED,
    MASKED_ACCURACY,
    MASKED_LM,
    MEMORY,
    PAGED_OPTIMIZER_STATE,
    PEAK_ALLOCATED,
    PEAK_RESERVED,
    RESERVED_SEGMENTS,
    TASK_METRICS,
    TOKEN_ACCURACY,
    Metric,
    TaskMetrics,
)
from .frame import (
    HIGHER_IS_BETTER,
    MEMORY_VERDICT,
    TIME_VERDICT,
    MemoryMeasure,
    accuracy_columns,
    pareto_cells,
    verdict_columns,
)


def noise_mark(verdict: Any) -> str:
    """'≈' after a comparison that the repeats cannot tell from noise."""
    return " ≈" if verdict == WITHIN_NOISE else ""


def fmt_mib(value: float) -> str:
    """A figure held in MiB: GiB from 1 GiB up; below 1 MiB two decimals, so it never reads as 0."""
    if value >= MIB_PER_GIB:
        return f"{value / MIB_PER_GIB:,.2f} GiB"
    return f"{value:,.1f} MiB" if value >= 1 or value == 0 else format_size(value * MIB)


def fmt_ratio(value: float) -> str:
    return "-" if is_missing(value) else f"{value:.2f}x"


def fmt_percent(value: float) -> str:
    return "-" if is_missing(value) else f"{100 * value:.1f}%"


def fmt_points(value: float) -> str:
    return "-" if is_missing(value) else f"{value:+.1f}"


def fmt_seconds(value: float) -> str:
    return "-" if is_missing(value) else (f"{value:,.1f} s" if value >= 10 else f"{value:.2f} s")


def extremes(frame: pd.DataFrame, column: str) -> tuple[Any, Any]:
    """(best, worst) values of a column among ok rows, or (None, None) when there is nothing to compare."""
    values = frame.loc[frame["status"].isin(TRAINED_STATUSES), column].dropna()
    if len(values) < 2 or values.min() == values.max():
        return None, None
    if column in HIGHER_IS_BETTER:
        return values.max(), values.min()
    return values.min(), values.max()


def reason_notes(frame: pd.DataFrame) -> tuple[dict[tuple[str, str], int], list[str]]:
    """A number for each distinct (status, reason) of the cells that are not ok, and the
    notes that say it: '[1] oom in 4, 1+2+4: CUDA out of memory ...'."""
    numbers: dict[tuple[str, str], int] = {}
    cells: dict[tuple[str, str], list[str]] = {}
    for row in frame.itertuples(index=False):
        if row.status == "ok" or is_missing(row.reason) or not str(row.reason).strip():
            continue
        key = (row.status, row.reason)
        numbers.setdefault(key, len(numbers) + 1)
        cells.setdefault(key, []).append(row.cell)
    notes = [f"[{number}] {status} in {', '.join(cells[status, reason])}: {reason}"
             for (status, reason), number in numbers.items()]
    return numbers, notes


def fmt_figure(metric: Metric, value: float) -> str:
    """An accuracy metric's value as every table shows it: a fraction as a percentage, else a number."""
    return fmt_percent(value) if metric.is_fraction else fmt_number(value)


def row_texts(row: Any, accuracy: TaskMetrics | None = None) -> tuple[str, ...]:
    """An ok row's figures as the terminal and HTML tables show them: memory, its ratio, time,
    its ratio, then the task's accuracy, its change in points and its second figure (a
    masked-LM: the seed's token accuracy; a causal LM: perplexity)."""
    if accuracy is None:
        accuracy = TASK_METRICS[CAUSAL_LM if getattr(row, "task", None) == CAUSAL_LM else MASKED_LM]
    memory = getattr(row, MEMORY.name)
    return (
        "-" if is_missing(memory) else fmt_mib(memory),
        fmt_ratio(row.memory_x_baseline) + noise_mark(getattr(row, MEMORY_VERDICT)),
        fmt_seconds(getattr(row, EPOCH_SECONDS.name)) + ("*" if getattr(row, EPOCH_TIME_EXTRAPOLATED.name) else "")
        + ("†" if row.memory_snapshot else ""),
        fmt_ratio(row.epoch_x_baseline) + noise_mark(getattr(row, TIME_VERDICT)),
        fmt_percent(getattr(row, accuracy.accuracy.name)),
        fmt_points(getattr(row, accuracy.delta.name)) + noise_mark(getattr(row, accuracy.accuracy.versus_baseline)),
        fmt_figure(accuracy.second, getattr(row, accuracy.second.name)),
    )


def shows_allocated(frame: pd.DataFrame) -> bool:
    """Whether a table of the run shows the allocated peak beside its memory column: every CUDA
    run's, whose memory column (NVML, or reserved) holds the allocator's caching too."""
    return bool(frame["device_type"].eq("cuda").any())


#: The allocated column's header in every table.
ALLOCATED_HEADER = "allocated"


def allocated_text(row: Any) -> str:
    """A row's allocated peak (torch.cuda.max_memory_allocated) as the tables show it."""
    value = getattr(row, PEAK_ALLOCATED.name)
    return "-" if is_missing(value) else fmt_mib(value)


def fmt_number(value: float) -> str:
    return "-" if is_missing(value) else f"{value:,.2f}"


def table_notes(frame: pd.DataFrame) -> list[str]:
    """The lines under every rendering of the table: extrapolated times, the frontier, repeats."""
    notes = []
    if frame[EPOCH_TIME_EXTRAPOLATED.name].eq(True).any():
        notes.append("* time per epoch extrapolated from the timed steps of a short run (train.max_steps)")
    if frame["memory_snapshot"].eq(True).any():
        notes.append("† recorded a CUDA memory snapshot (a stack per allocation): slower than an unrecorded run, "
                     "so compare its time only with runs that recorded one too")
    repeated = frame.dropna(subset=["train_sentences_repeated"])
    repeated = repeated[repeated["train_sentences_repeated"] > 0]
    if not repeated.empty:
        row = repeated.iloc[0]
        notes.append(f"the training split repeats {int(row.train_sentences_repeated):,} sentences: {row.corpus_source} "
                     "has fewer unique ones than data.train_sentences asks for, so an epoch keeps its length")
    paged = frame.dropna(subset=[PAGED_OPTIMIZER_STATE.name])
    if not paged.empty:
        amounts = ", ".join(f"{row.cell} {fmt_mib(row.paged_optimizer_state_mib)}" for row in paged.itertuples())
        notes.append(f"optimizer state in CUDA unified memory, outside the memory column (add it before comparing): {amounts}")
    notes += turned_off_notes(frame)
    frontier_cells = pareto_cells(frame)
    if len(frontier_cells) > 1:
        notes.append(f"Pareto frontier (no other cell is both smaller and faster): {', '.join(frontier_cells)}")
    return (notes + model_lines(frame) + setup_notes(frame, "objective") + setup_notes(frame, "attention")
            + allocator_notes(frame) + repeat_notes(frame))


def allocator_notes(frame: pd.DataFrame) -> list[str]:
    """The CUDA allocator's setting (PYTORCH_CUDA_ALLOC_CONF), named when a CUDA cell ran (on a
    CPU run only when it is not PyTorch's default, saying it had no effect), then a line for each
    CUDA cell whose reserve is the allocator's caching rather than tensors."""
    cuda = frame["device_type"].eq("cuda")
    settings = frame.loc[cuda, "allocator"] if cuda.any() else frame["allocator"]
    values = list(dict.fromkeys(settings.dropna()))
    if not cuda.any():
        values = [value for value in values if value != NOT_RECORDED and "unset" not in value]
    lines = []
    suffix = "" if cuda.any() else "; no effect on CPU"
    if len(values) == 1:
        lines.append(f"allocator: {values[0]}{suffix}")
    elif len(values) > 1:
        by_value = "; ".join(f"{value}: {', '.join(frame.loc[frame['allocator'] == value, 'cell'])}" for value in values)
        lines.append(f"allocator settings differ between cells, so their reserved and NVML peaks are not comparable "
                     f"({by_value}){suffix}")
    for row in frame[cuda & frame["status"].isin(TRAINED_STATUSES)].itertuples(index=False):
        segments = getattr(row, RESERVED_SEGMENTS.name)
        allocated, reserved = getattr(row, PEAK_ALLOCATED.name), getattr(row, PEAK_RESERVED.name)
        if not isinstance(segments, list) or is_missing(allocated) or is_missing(reserved):
            continue
        note = caching_note(str(row.cell), allocated, reserved, segments)
        if note:
            lines.append(note)
    return lines


def turned_off_notes(frame: pd.DataFrame) -> list[str]:
    """What a strategy turned off although the config asked for it, with the cells it
    happened in: a cell that trained differently from its config must say so."""
    cells: dict[str, list[str]] = {}
    for row in frame.dropna(subset=["turned_off"]).itertuples():
        for what in str(row.turned_off).split("\n"):
            cells.setdefault(what, []).append(str(row.cell))
    return [f"turned off in {', '.join(names)}: {what}" for what, names in cells.items()]


def model_lines(frame: pd.DataFrame) -> list[str]:
    """The model the run trained, when it is not the seed's BERT, and what loading did to it
    (a head newly initialised, weights ignored): a reader must know before reading accuracy."""
    known = frame.dropna(subset=["architecture"])
    if known.empty:
        return []
    row = known.iloc[0]
    lines = []
    accuracy = accuracy_columns(frame)
    if row.architecture != "BertForMaskedLM" or accuracy.task != MASKED_LM:
        shown = " and ".join(metric.shown_as.terminal for metric in accuracy.shown)
        lines.append(f"model: {row.architecture}, {int(row.model_parameters):,} parameters; the accuracy columns show "
                     f"{shown}" if not is_missing(row.model_parameters) else f"model: {row.architecture}")
    notes = known["model_notes"].dropna()
    if not notes.empty:
        lines += str(notes.iloc[0]).split("\n")
    return lines


#: Run-wide settings every table names, what each value means, and what differs when cells disagree.
SETUP_SETTINGS = {
    "objective": (OBJECTIVES, "their accuracies"),
    "attention": (ATTENTION_KERNELS, "their memory and time"),
}


def setup_notes(frame: pd.DataFrame, column: str) -> list[str]:
    """Which ``column`` setting (objective, attention) the cells ran under: one line when
    they agree, the cells of each value when they do not."""
    values = list(dict.fromkeys(frame[column].dropna()))
    if not values:
        return []
    meanings, what_differs = SETUP_SETTINGS[column]
    if len(values) > 1:
        by_value = "; ".join(f"{value}: {', '.join(frame.loc[frame[column] == value, 'cell'])}" for value in values)
        return [f"{column} differs between cells, so {what_differs} are not comparable ({by_value})"]
    value = values[0]
    notes = [f"{column}: {value} ({meanings.get(value, 'as transformers names it')})"]
    if column == "objective" and value == "seed":
        notes.append(f"{TOKEN_ACCURACY.shown_as.terminal} scores every real token, most of them visible and copied: "
                     f"under this objective it reads far above {MASKED_ACCURACY.shown_as.terminal}, as the seed's 89% did")
    return notes


def repeat_notes(frame: pd.DataFrame) -> list[str]:
    """What the figures of a repeated run are, and what '≈' means."""
    counts = frame.loc[frame["status"] == "ok", "repeats"].dropna()
    if counts.empty or counts.max() <= 1:
        return []
    notes = [f"figures are medians of {int(counts.min())}-{int(counts.max())} repeats" if counts.min() != counts.max()
             else f"figures are medians of {int(counts.max())} repeats"]
    if frame[list(verdict_columns(accuracy_columns(frame)))].eq(WITHIN_NOISE).any().any():
        notes.append("≈ within noise of the baseline: the repeats' ranges overlap (outliers left out)")
    return notes


def _baseline_value(frame: pd.DataFrame, baseline: str, column: str) -> Any:
    rows = frame[(frame["cell"] == baseline) & (frame["status"] == "ok")]
    return None if rows.empty else rows.iloc[0][column]


def markdown(frame: pd.DataFrame, measure: MemoryMeasure, results: list[CellResult], baseline: str = "baseline") -> str:
    """A GitHub table shaped like the seed's, baseline figures in the headers, then provenance."""
    memory = _baseline_value(frame, baseline, MEMORY.name)
    seconds = _baseline_value(frame, baseline, EPOCH_SECONDS.name)
    accuracy = accuracy_columns(frame)
    headline = _baseline_value(frame, baseline, accuracy.accuracy.name)
    second = _baseline_value(frame, baseline, accuracy.second.name)

    def header(label: str, value: Any, fmt) -> str:
        return f"{label} ({baseline}: {fmt(value)})" if not is_missing(value) else label

    allocated = shows_allocated(frame)
    lines = [
        "| strategy | " + " | ".join([
            header(measure.label, memory, fmt_mib),
            *([header(ALLOCATED_HEADER, _baseline_value(frame, baseline, PEAK_ALLOCATED.name), fmt_mib)]
              if allocated else []),
            header("time / epoch", seconds, fmt_seconds),
            header(accuracy.accuracy.shown_as.markdown, headline, fmt_percent),
            header(accuracy.second.shown_as.markdown, second, lambda value: fmt_figure(accuracy.second, value)),
        ]) + " | status |",
        "|:---|---:|" + ("---:|" if allocated else "") + "---:|---:|---:|:---|",
    ]
    for row in frame.itertuples(index=False):
        name = row.cell if row.strategies in ("baseline", row.cell) else f"{row.cell} ({row.strategies})"
        reason = str(row.reason or "").replace("|", "\\|")
        if row.status not in TRAINED_STATUSES:
            lines.append(f"| {name} | " + f"{row.status} | " * (5 if allocated else 4) + f"{row.status}: {reason} |")
            continue
        memory, memory_x, seconds, seconds_x, accuracy_text, delta_text, second_text = row_texts(row, accuracy)
        status = "ok" if row.status == "ok" else f"{row.status}: {reason}"
        allocated_cell = f" {allocated_text(row)} |" if allocated else ""
        lines.append(f"| {name} | {memory} ({memory_x}) |{allocated_cell} {seconds} ({seconds_x}) | {accuracy_text} "
                     f"({delta_text}) | {second_text} | {status} |")
    lines.append("")
    lines += [f"- {note}".replace("- *", "- \\*", 1) for note in table_notes(frame)]
    lines += provenance_lines(results, measure)
    return "\n".join(lines) + "\n"


def provenance_lines(results: list[CellResult], measure: MemoryMeasure) -> list[str]:
    first = next((r for r in results if r.provenance), results[0])
    device = first.device or {}
    if device.get("type") == "cuda":
        where = f"{device.get('name')} ({format_gib(device.get('total_memory_mib', 0) * MIB)}, CUDA {device.get('cuda_runtime')})"
    else:
        where = f"CPU ({first.provenance.get('cpu_threads', '?')} threads)"
    packages = first.provenance.get("packages", {})
    versions = ", ".join(f"{name} {version}" for name, version in packages.items() if version)
    method = first.method(measure.metric)
    ranks = next((r.distributed for r in results if r.distributed), None)
    spread = (
        [f"- **ranks:** {ranks['world_size']} per cell via torchrun; memory is the largest rank's "
         "(mean and total per rank in report.csv)"] if ranks else []
    )
    return spread + [
        f"- **device:** {where}",
        f"- **preset:** {first.preset}; memory column: `{measure.metric}` ({method})",
        f"- **packages:** {versions}, Python {first.provenance.get('python', '?')}",
    ]


