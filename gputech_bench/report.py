"""The comparison table: one DataFrame, rendered as a terminal table, markdown, CSV or JSON.

Every rendering reads the same frame, so the numbers cannot disagree between formats.
Columns have stable names and a declared direction (lower or higher is better).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from .atomic import atomic_write_bytes
from .matrix import SEED_MATRIX
from .pareto import frontier
from .rank_results import MEMORY_METRICS
from .config import ATTENTION_KERNELS, OBJECTIVES
from .results import TRAINED_STATUSES, ResultError, attention_of, objective_of, read_result, recorded_snapshot
from .stats import WITHIN_NOISE, Summary, versus

FAILED = "failed"

#: Metrics copied from each result, in column order.
METRIC_COLUMNS = (
    *MEMORY_METRICS,
    "epoch_seconds",
    "epoch_time_extrapolated",
    "samples_per_second",
    "mean_step_seconds",
    "first_step_seconds",
    "tracked_step_seconds",
    "cell_seconds",
    "compile_seconds",
    "steps_run",
    "nonfinite_loss_steps",
    "paged_optimizer_state_mib",
    "eval_masked_accuracy",
    "eval_token_accuracy",
    "eval_loss",
    "final_train_loss",
)
CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "temporaries", "other")
BREAKDOWN_COLUMNS = tuple(f"tracked_{side}_{category}_mib" for side in ("device", "host") for category in CATEGORIES)
#: Against the baseline, from the repeats' ranges: "lower", "higher", "within noise",
#: "single run" (no repeats to judge by), or empty for the baseline itself.
VERDICT_COLUMNS = ("memory_vs_baseline", "time_vs_baseline", "masked_accuracy_vs_baseline")
DERIVED_COLUMNS = (
    "memory_mib",
    "memory_rank_mean_mib",
    "memory_all_ranks_mib",
    "memory_x_baseline",
    "epoch_x_baseline",
    "masked_accuracy_delta_points",
    "token_accuracy_delta_points",
)
OOM_COLUMNS = ("oom_requested_mib", "oom_in_use_mib", "gpu_memory_limit_mib")
INFO_COLUMNS = (
    "pareto", "world_size", "device_type", "device_name", "compute_dtype", "optimizer", "trainable_parameters",
    "total_parameters", "preset", "objective", "attention", "memory_snapshot", "corpus_source",
    "train_sentences_repeated",
)
COLUMNS = (
    "cell", "strategies", "status", "reason", "repeats",
    *DERIVED_COLUMNS, *VERDICT_COLUMNS, *METRIC_COLUMNS, *BREAKDOWN_COLUMNS, *OOM_COLUMNS, *INFO_COLUMNS,
)

#: Which way is better, for colouring and for readers of the CSV.
LOWER_IS_BETTER = {"memory_mib", "memory_x_baseline", "epoch_seconds", "epoch_x_baseline", "eval_loss", "final_train_loss"}
HIGHER_IS_BETTER = {"eval_masked_accuracy", "eval_token_accuracy", "masked_accuracy_delta_points", "samples_per_second"}


@dataclass(frozen=True)
class MemoryMeasure:
    """The headline memory figure: the seed's nvidia-smi number on CUDA, the tensor peak on CPU."""

    metric: str
    label: str


CPU_MEASURE = MemoryMeasure("tracked_peak_mib", "tensor peak (CPU)")
NVML_MEASURE = MemoryMeasure("nvml_process_peak_mib", "GPU memory (NVML)")
RESERVED_MEASURE = MemoryMeasure("peak_reserved_mib", "GPU memory (reserved)")


@dataclass
class LoadedRun:
    root: Path
    results: list[dict[str, Any]]
    #: One line per file that was named and skipped.
    problems: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None


NON_RESULT_FILES = {"config.json", "report.json", "estimate.json"}


def load_run(root: Path) -> LoadedRun:
    """Every cell result of a run folder; unreadable or foreign files are named and skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ResultError(f"'{root}' is not a run folder: pass a folder made by 'gputech-bench run' (e.g. results/NAME)")
    run = LoadedRun(root, [])
    try:
        run.config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        run.config = None
    for path in sorted(root.glob("*.json")):
        if path.name in NON_RESULT_FILES:
            continue
        try:
            run.results.append(read_result(path))
        except ResultError as error:
            run.problems.append(f"skipped {error}")
    if not run.results:
        raise ResultError(f"no cell results in '{root}': run 'gputech-bench run --results {root.parent} --run-name {root.name}' first")
    run.results.sort(key=lambda result: cell_order(result["cell"]))
    return run


def cell_order(cell: str) -> tuple[int, str]:
    return (SEED_MATRIX.index(cell), "") if cell in SEED_MATRIX else (len(SEED_MATRIX), cell)


def _metric(result: dict[str, Any], name: str) -> Any:
    entry = result.get("metrics", {}).get(name)
    return entry.get("value") if isinstance(entry, dict) else None


def memory_measure(results: list[dict[str, Any]]) -> MemoryMeasure:
    ok = [r for r in results if r["status"] == "ok"]
    if not any(r.get("device", {}).get("type") == "cuda" for r in results):
        if any(r.get("distributed") for r in results):
            return MemoryMeasure(CPU_MEASURE.metric, f"{CPU_MEASURE.label}, largest rank")
        return CPU_MEASURE
    measure = NVML_MEASURE if all(_metric(r, NVML_MEASURE.metric) is not None for r in ok) else RESERVED_MEASURE
    if any(r.get("distributed") for r in results):
        measure = MemoryMeasure(measure.metric, f"{measure.label}, largest rank")
    caps = {r["memory_cap"]["limit_mib"] for r in results if r.get("memory_cap")}
    if caps:
        limit = max(caps)
        measure = MemoryMeasure(measure.metric, f"{measure.label}, cap {limit / 1024:.1f} GiB")
    return measure


def _row(result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "cell": result["cell"],
        "strategies": "+".join(result.get("strategies", [])) or "baseline",
        "status": result["status"],
        "reason": result.get("reason"),
        "repeats": result.get("repeats", {}).get("ok", 1),
    }
    for name in METRIC_COLUMNS:
        row[name] = _metric(result, name)
    breakdown = result.get("memory_breakdown", {})
    device_type = result.get("device", {}).get("type", "cpu")
    for device, categories in breakdown.items():
        side = "device" if device.startswith(device_type) else "host"
        for category in CATEGORIES:
            row[f"tracked_{side}_{category}_mib"] = categories.get(f"{category}_mib")
    oom = result.get("oom", {})
    row.update(
        oom_requested_mib=oom.get("requested_mib"),
        oom_in_use_mib=oom.get("process_in_use_mib", oom.get("allocated_by_pytorch_mib")),
        gpu_memory_limit_mib=result.get("memory_cap", {}).get("limit_mib"),
    )
    facts = result.get("strategy_facts", {})
    row["world_size"] = result.get("distributed", {}).get("world_size", 1)
    row.update(
        device_type=result.get("device", {}).get("type"),
        device_name=result.get("device", {}).get("name", "cpu" if device_type == "cpu" else None),
        compute_dtype=facts.get("compute_dtype"),
        optimizer=facts.get("optimizer"),
        trainable_parameters=facts.get("trainable_parameters"),
        total_parameters=facts.get("total_parameters"),
        preset=result.get("preset"),
        objective=objective_of(result),
        attention=attention_of(result),
        memory_snapshot=recorded_snapshot(result),
        corpus_source=result.get("data", {}).get("corpus_source"),
        train_sentences_repeated=result.get("data", {}).get("train_sentences_repeated"),
    )
    return row


def build_frame(results: list[dict[str, Any]], baseline: str = "baseline") -> tuple[pd.DataFrame, MemoryMeasure]:
    """One row per cell with every measured field and the comparisons against ``baseline``."""
    measure = memory_measure(results)
    frame = pd.DataFrame([_row(result) for result in results]).reindex(columns=list(COLUMNS))
    numeric = [c for c in (*DERIVED_COLUMNS, *METRIC_COLUMNS, *BREAKDOWN_COLUMNS) if c != "epoch_time_extrapolated"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce").astype("float64")
    frame["memory_mib"] = frame[measure.metric]
    spread = [result.get("memory_per_rank", {}).get(measure.metric, {}) for result in results]
    frame["memory_rank_mean_mib"] = [entry.get("mean", math.nan) for entry in spread]
    frame["memory_all_ranks_mib"] = [entry.get("total", math.nan) for entry in spread]
    base = frame[(frame["cell"] == baseline) & (frame["status"] == "ok")]
    if not base.empty:
        reference = base.iloc[0]
        frame["memory_x_baseline"] = frame["memory_mib"] / reference["memory_mib"]
        frame["epoch_x_baseline"] = frame["epoch_seconds"] / reference["epoch_seconds"]
        frame["masked_accuracy_delta_points"] = 100 * (frame["eval_masked_accuracy"] - reference["eval_masked_accuracy"])
        frame["token_accuracy_delta_points"] = 100 * (frame["eval_token_accuracy"] - reference["eval_token_accuracy"])
    failed = ~frame["status"].isin(TRAINED_STATUSES)
    frame.loc[failed, list(numeric)] = float("nan")  # a failed cell's partial figures are not comparable
    on_frontier = set(pareto_cells(frame))
    frame["pareto"] = frame["cell"].isin(on_frontier)
    reference = next((r for r in results if r["cell"] == baseline and r["status"] == "ok"), None)
    for column, metric in zip(VERDICT_COLUMNS, (measure.metric, "epoch_seconds", "eval_masked_accuracy")):
        frame[column] = [_verdict(result, reference, metric) for result in results]
    return frame, measure


def _statistics(result: dict[str, Any], metric: str) -> Summary | None:
    data = result.get("repeats", {}).get("statistics", {}).get(metric)
    return Summary.from_dict(data) if data else None


def _verdict(result: dict[str, Any], reference: dict[str, Any] | None, metric: str) -> str | None:
    """How ``result`` stands against the baseline on ``metric``, judged by the repeats' spread."""
    if reference is None or result is reference or result["status"] != "ok":
        return None
    mine, theirs = _statistics(result, metric), _statistics(reference, metric)
    if mine is None or theirs is None:
        return None
    return versus(mine, theirs)


def noise_mark(verdict: Any) -> str:
    """'≈' after a comparison that the repeats cannot tell from noise."""
    return " ≈" if verdict == WITHIN_NOISE else ""


def pareto_cells(frame: pd.DataFrame) -> list[str]:
    """The finished cells no other beats on both memory and time per epoch, smallest first."""
    trained = frame[frame["status"].isin(TRAINED_STATUSES)]
    return frontier(zip(trained["cell"], trained["memory_mib"], trained["epoch_seconds"]))


# --------------------------------------------------------------------------- formatting


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_mib(value: float) -> str:
    return f"{value / 1024:,.2f} GiB" if value >= 1024 else f"{value:,.1f} MiB"


def fmt_ratio(value: float) -> str:
    return "-" if _missing(value) else f"{value:.2f}x"


def fmt_percent(value: float) -> str:
    return "-" if _missing(value) else f"{100 * value:.1f}%"


def fmt_points(value: float) -> str:
    return "-" if _missing(value) else f"{value:+.1f}"


def fmt_seconds(value: float) -> str:
    return "-" if _missing(value) else (f"{value:,.1f} s" if value >= 10 else f"{value:.2f} s")


def _extremes(frame: pd.DataFrame, column: str) -> tuple[Any, Any]:
    """(best, worst) values of a column among ok rows, or (None, None) when there is nothing to compare."""
    values = frame.loc[frame["status"].isin(TRAINED_STATUSES), column].dropna()
    if len(values) < 2 or values.min() == values.max():
        return None, None
    if column in HIGHER_IS_BETTER:
        return values.max(), values.min()
    return values.min(), values.max()


def _styled(text: str, value: Any, extremes: tuple[Any, Any]) -> str:
    best, worst = extremes
    if best is not None and value == best:
        return f"[bold green]{text}[/]"
    if worst is not None and value == worst:
        return f"[red]{text}[/]"
    return text


def rich_table(frame: pd.DataFrame, measure: MemoryMeasure, title: str = "gputech-bench") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("cell", no_wrap=True)
    table.add_column(f"{measure.label}", justify="right")
    table.add_column("x base", justify="right")
    table.add_column("time / epoch", justify="right")
    table.add_column("x base", justify="right")
    table.add_column("masked acc", justify="right")
    table.add_column("Δ pts", justify="right")
    table.add_column("token acc (seed)", justify="right")
    table.add_column("status")
    columns = ("memory_mib", "memory_x_baseline", "epoch_seconds", "epoch_x_baseline", "eval_masked_accuracy",
               "masked_accuracy_delta_points", "eval_token_accuracy")
    extremes = {column: _extremes(frame, column) for column in columns}
    for row in frame.itertuples(index=False):
        if row.status not in TRAINED_STATUSES:
            reason = row.reason or ""
            table.add_row(row.cell, *["-"] * 7, f"[bold red]{row.status}[/]: {reason}")
            continue
        styled = [_styled(text, getattr(row, column), extremes[column]) for text, column in zip(row_texts(row), columns)]
        table.add_row(row.cell, *styled, "[green]ok[/]" if row.status == "ok" else f"[bold red]{row.status}[/]: {row.reason}")
    table.caption = "\n".join(table_notes(frame)) or None
    return table


def row_texts(row: Any) -> tuple[str, ...]:
    """An ok row's figures as the terminal and HTML tables show them: memory, its ratio, time,
    its ratio, masked accuracy, its change in points, the seed's token accuracy."""
    return (
        "-" if _missing(row.memory_mib) else fmt_mib(row.memory_mib),
        fmt_ratio(row.memory_x_baseline) + noise_mark(row.memory_vs_baseline),
        fmt_seconds(row.epoch_seconds) + ("*" if row.epoch_time_extrapolated else "") + ("†" if row.memory_snapshot else ""),
        fmt_ratio(row.epoch_x_baseline) + noise_mark(row.time_vs_baseline),
        fmt_percent(row.eval_masked_accuracy),
        fmt_points(row.masked_accuracy_delta_points) + noise_mark(row.masked_accuracy_vs_baseline),
        fmt_percent(row.eval_token_accuracy),
    )


def table_notes(frame: pd.DataFrame) -> list[str]:
    """The lines under every rendering of the table: extrapolated times, the frontier, repeats."""
    notes = []
    if frame["epoch_time_extrapolated"].eq(True).any():
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
    paged = frame.dropna(subset=["paged_optimizer_state_mib"])
    if not paged.empty:
        amounts = ", ".join(f"{row.cell} {fmt_mib(row.paged_optimizer_state_mib)}" for row in paged.itertuples())
        notes.append(f"optimizer state in CUDA unified memory, outside the memory column (add it before comparing): {amounts}")
    frontier_cells = pareto_cells(frame)
    if len(frontier_cells) > 1:
        notes.append(f"Pareto frontier (no other cell is both smaller and faster): {', '.join(frontier_cells)}")
    return notes + setup_notes(frame, "objective") + setup_notes(frame, "attention") + repeat_notes(frame)


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
        notes.append("token acc (seed) scores every real token, most of them visible and copied: under this "
                     "objective it reads far above masked acc, as the seed's 89% did")
    return notes


def repeat_notes(frame: pd.DataFrame) -> list[str]:
    """What the figures of a repeated run are, and what '≈' means."""
    counts = frame.loc[frame["status"] == "ok", "repeats"].dropna()
    if counts.empty or counts.max() <= 1:
        return []
    notes = [f"figures are medians of {int(counts.min())}-{int(counts.max())} repeats" if counts.min() != counts.max()
             else f"figures are medians of {int(counts.max())} repeats"]
    if frame[list(VERDICT_COLUMNS)].eq(WITHIN_NOISE).any().any():
        notes.append("≈ within noise of the baseline: the repeats' ranges overlap (outliers left out)")
    return notes


def _baseline_value(frame: pd.DataFrame, baseline: str, column: str) -> Any:
    rows = frame[(frame["cell"] == baseline) & (frame["status"] == "ok")]
    return None if rows.empty else rows.iloc[0][column]


def markdown(frame: pd.DataFrame, measure: MemoryMeasure, results: list[dict[str, Any]], baseline: str = "baseline") -> str:
    """A GitHub table shaped like the seed's, baseline figures in the headers, then provenance."""
    memory = _baseline_value(frame, baseline, "memory_mib")
    seconds = _baseline_value(frame, baseline, "epoch_seconds")
    masked = _baseline_value(frame, baseline, "eval_masked_accuracy")
    token = _baseline_value(frame, baseline, "eval_token_accuracy")

    def header(label: str, value: Any, fmt) -> str:
        return f"{label} ({baseline}: {fmt(value)})" if not _missing(value) else label

    lines = [
        "| strategy | " + " | ".join([
            header(measure.label, memory, fmt_mib),
            header("time / epoch", seconds, fmt_seconds),
            header("eval accuracy, masked", masked, fmt_percent),
            header("token accuracy, seed's", token, fmt_percent),
        ]) + " | status |",
        "|:---|---:|---:|---:|---:|:---|",
    ]
    for row in frame.itertuples(index=False):
        name = row.cell if row.strategies in ("baseline", row.cell) else f"{row.cell} ({row.strategies})"
        reason = str(row.reason or "").replace("|", "\\|")
        if row.status not in TRAINED_STATUSES:
            lines.append(f"| {name} | {row.status} | {row.status} | {row.status} | {row.status} | {row.status}: {reason} |")
            continue
        memory, memory_x, seconds, seconds_x, masked_acc, masked_delta, token_acc = row_texts(row)
        status = "ok" if row.status == "ok" else f"{row.status}: {reason}"
        lines.append(f"| {name} | {memory} ({memory_x}) | {seconds} ({seconds_x}) | {masked_acc} ({masked_delta}) "
                     f"| {token_acc} | {status} |")
    lines.append("")
    lines += [f"- {note}".replace("- *", "- \\*", 1) for note in table_notes(frame)]
    lines += provenance_lines(results, measure)
    return "\n".join(lines) + "\n"


def provenance_lines(results: list[dict[str, Any]], measure: MemoryMeasure) -> list[str]:
    ok = [r for r in results if r.get("provenance")] or results
    first = ok[0]
    device = first.get("device", {})
    if device.get("type") == "cuda":
        where = f"{device.get('name')} ({device.get('total_memory_mib', 0) / 1024:.1f} GiB, CUDA {device.get('cuda_runtime')})"
    else:
        where = f"CPU ({first.get('provenance', {}).get('cpu_threads', '?')} threads)"
    packages = first.get("provenance", {}).get("packages", {})
    versions = ", ".join(f"{name} {version}" for name, version in packages.items() if version)
    method = (first.get("metrics", {}).get(measure.metric) or {}).get("method", "")
    ranks = next((r["distributed"] for r in results if r.get("distributed")), None)
    spread = (
        [f"- **ranks:** {ranks['world_size']} per cell via torchrun; memory is the largest rank's "
         "(mean and total per rank in report.csv)"] if ranks else []
    )
    return spread + [
        f"- **device:** {where}",
        f"- **preset:** {first.get('preset')}; memory column: `{measure.metric}` ({method})",
        f"- **packages:** {versions}, Python {first.get('provenance', {}).get('python', '?')}",
    ]


def to_json(frame: pd.DataFrame, measure: MemoryMeasure, baseline: str) -> str:
    rows = json.loads(frame.to_json(orient="records"))  # NaN becomes null
    payload = {
        "schema": "gputech-bench/report/1",
        "baseline": baseline,
        "memory_column": measure.metric,
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "higher_is_better": sorted(HIGHER_IS_BETTER),
        "rows": rows,
    }
    return json.dumps(payload, indent=2) + "\n"


def to_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


FORMATS = ("table", "md", "csv", "json", "html")


def render(run: LoadedRun, fmt: str, baseline: str = "baseline") -> str | Table:
    frame, measure = build_frame(run.results, baseline)
    return _render(run, frame, measure, fmt, baseline)


def _render(run: LoadedRun, frame: pd.DataFrame, measure: MemoryMeasure, fmt: str, baseline: str) -> str | Table:
    if fmt == "table":
        return rich_table(frame, measure, title=f"gputech-bench: {run.root.name}")
    if fmt == "md":
        return markdown(frame, measure, run.results, baseline)
    if fmt == "csv":
        return to_csv(frame)
    if fmt == "json":
        return to_json(frame, measure, baseline)
    if fmt == "html":
        from .html_report import html_report  # matplotlib only when asked for

        return html_report(run, frame, measure, baseline)
    raise ValueError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")


def write_exports(run: LoadedRun, baseline: str = "baseline") -> list[Path]:
    """report.md, report.csv and report.json beside the results."""
    frame, measure = build_frame(run.results, baseline)
    written = []
    for fmt, extension in (("md", "md"), ("csv", "csv"), ("json", "json")):
        path = run.root / f"report.{extension}"
        text = _render(run, frame, measure, fmt, baseline)
        assert isinstance(text, str)
        atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)
    return written
