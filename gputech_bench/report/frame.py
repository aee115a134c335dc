"""One DataFrame of a run: a row per cell with every measured figure, its comparison
against the baseline, and the settings that explain it.

Columns have stable names and a declared direction (lower or higher is better). Every
rendering (``table``, ``export``, ``html``, ``plots``) reads this frame, so the numbers
cannot disagree between formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..metrics import (
    DELTA_OF,
    DERIVED_METRICS,
    EPOCH_SECONDS,
    EPOCH_TIME_EXTRAPOLATED,
    EPOCH_X_BASELINE,
    MASKED_LM_METRICS,
    MEASURED,
    MEMORY,
    MEMORY_ALL_RANKS,
    MEMORY_CATEGORIES,
    MEMORY_RANK_MEAN,
    MEMORY_X_BASELINE,
    NVML_PROCESS_PEAK,
    PEAK_RESERVED,
    RESERVED_SEGMENTS,
    TASK_BEFORE_CAUSAL_LMS,
    TRACKED_PEAK,
    Direction,
    TaskMetrics,
    ranked,
    task_metrics,
)
from ..measure.allocator import describe as describe_allocator
from ..results import TRAINED_STATUSES, CellResult
from ..stats import versus
from ..units import MIB, format_gib
from .pareto import frontier

FAILED = "failed"

#: Metrics copied from each result, in column order: every measured metric of the catalogue,
#: whatever the task (a stable schema: those of the other task stay empty).
METRIC_COLUMNS = tuple(metric.name for metric in MEASURED)
#: MemTracker's categories, and qlora's 4-bit weights (absent, so empty, in every other cell).
CATEGORIES = tuple(category.name for category in MEMORY_CATEGORIES)
BREAKDOWN_COLUMNS = tuple(f"tracked_{side}_{category}_mib" for side in ("device", "host") for category in CATEGORIES)
#: Against the baseline, from the repeats' ranges: "lower", "higher", "within noise",
#: "single run" (no repeats to judge by), or empty for the baseline itself. Memory and time,
#: then the task's compared accuracy metrics (``verdict_columns``).
MEMORY_VERDICT, TIME_VERDICT = "memory_vs_baseline", "time_vs_baseline"
DERIVED_COLUMNS = tuple(metric.name for metric in DERIVED_METRICS)
OOM_COLUMNS = ("oom_requested_mib", "oom_in_use_mib", "gpu_memory_limit_mib")
INFO_COLUMNS = (
    "pareto", "world_size", "device_type", "device_name", "compute_dtype", "optimizer", "trainable_parameters",
    "total_parameters", "preset", "objective", "attention", "memory_snapshot", "corpus_source",
    "train_sentences_repeated", "task", "architecture", "model_parameters", "model_notes", "turned_off", "allocator",
)


def verdict_columns(accuracy: TaskMetrics) -> tuple[str, ...]:
    """The verdict columns of a run of ``accuracy``'s task."""
    return (MEMORY_VERDICT, TIME_VERDICT, *(metric.versus_baseline for metric in accuracy.compared))


def frame_columns(accuracy: TaskMetrics) -> tuple[str, ...]:
    """The frame's columns, in order, for a run of ``accuracy``'s task."""
    return ("cell", "strategies", "status", "reason", "repeats", *DERIVED_COLUMNS, *verdict_columns(accuracy),
            *METRIC_COLUMNS, *BREAKDOWN_COLUMNS, *OOM_COLUMNS, *INFO_COLUMNS)


#: A masked-LM run's columns (the schema report.csv has always had).
COLUMNS = frame_columns(MASKED_LM_METRICS)
#: The verdict columns of a masked-LM run.
VERDICT_COLUMNS = verdict_columns(MASKED_LM_METRICS)

#: Which way is better, for colouring and for readers of the CSV.
LOWER_IS_BETTER = {metric.name for metric in ranked(Direction.LOWER)}
HIGHER_IS_BETTER = {metric.name for metric in ranked(Direction.HIGHER)}


def accuracy_columns(frame: pd.DataFrame) -> TaskMetrics:
    """The accuracy metrics for the run's task (a run trains one model, so one task)."""
    return task_metrics(frame["task"] if "task" in frame else ())


def task_of(result: CellResult) -> str | None:
    """The task the cell's model was trained on; None for a result that never loaded a model."""
    # Results written before causal LMs were supported trained a masked-LM.
    return (result.model or {}).get("task", TASK_BEFORE_CAUSAL_LMS) if result.model else None


def results_metrics(results: list[CellResult]) -> TaskMetrics:
    """The accuracy metrics of a run, from its results."""
    return task_metrics(task_of(result) for result in results)


@dataclass(frozen=True)
class MemoryMeasure:
    """The headline memory figure: the seed's nvidia-smi number on CUDA, the tensor peak on CPU."""

    metric: str
    label: str


CPU_MEASURE = MemoryMeasure(TRACKED_PEAK.name, "tensor peak (CPU)")
NVML_MEASURE = MemoryMeasure(NVML_PROCESS_PEAK.name, "GPU memory (NVML)")
RESERVED_MEASURE = MemoryMeasure(PEAK_RESERVED.name, "GPU memory (reserved)")


def memory_measure(results: list[CellResult]) -> MemoryMeasure:
    ok = [r for r in results if r.ok]
    distributed = any(r.distributed for r in results)
    if not any(r.device_type == "cuda" for r in results):
        if distributed:
            return MemoryMeasure(CPU_MEASURE.metric, f"{CPU_MEASURE.label}, largest rank")
        return CPU_MEASURE
    measure = NVML_MEASURE if all(r.value(NVML_MEASURE.metric) is not None for r in ok) else RESERVED_MEASURE
    if distributed:
        measure = MemoryMeasure(measure.metric, f"{measure.label}, largest rank")
    caps = {r.memory_cap["limit_mib"] for r in results if r.memory_cap}
    if caps:
        limit = max(caps)
        measure = MemoryMeasure(measure.metric, f"{measure.label}, cap {format_gib(limit * MIB)}")
    return measure


def _row(result: CellResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "cell": result.cell,
        "strategies": "+".join(result.strategies or []) or "baseline",
        "status": result.status,
        "reason": result.reason,
        "repeats": (result.repeats or {}).get("ok", 1),
    }
    for name in METRIC_COLUMNS:
        row[name] = result.value(name)
    device_type = result.device_type or "cpu"
    for device, categories in result.memory_breakdown.items():
        side = "device" if device.startswith(device_type) else "host"
        for category in CATEGORIES:
            row[f"tracked_{side}_{category}_mib"] = categories.get(f"{category}_mib")
    oom = result.oom or {}
    device_info, facts, data = result.device or {}, result.strategy_facts or {}, result.data or {}
    row.update(
        oom_requested_mib=oom.get("requested_mib"),
        oom_in_use_mib=oom.get("process_in_use_mib", oom.get("allocated_by_pytorch_mib")),
        gpu_memory_limit_mib=(result.memory_cap or {}).get("limit_mib"),
        world_size=(result.distributed or {}).get("world_size", 1),
        device_type=result.device_type,
        device_name=device_info.get("name", "cpu" if device_type == "cpu" else None),
        compute_dtype=facts.get("compute_dtype"),
        optimizer=facts.get("optimizer"),
        trainable_parameters=facts.get("trainable_parameters"),
        total_parameters=facts.get("total_parameters"),
        preset=result.preset,
        objective=result.objective,
        attention=result.attention,
        memory_snapshot=result.recorded_snapshot,
        corpus_source=data.get("corpus_source"),
        train_sentences_repeated=data.get("train_sentences_repeated"),
        task=task_of(result),
        architecture=(result.model or {}).get("architecture"),
        model_parameters=(result.model or {}).get("parameters"),
        model_notes=model_notes(result),
        turned_off=turned_off(result),
        allocator=allocator_setting(result),
    )
    return row


def allocator_setting(result: CellResult) -> str:
    """The CUDA allocator's setting the cell ran under, in words (``measure.allocator.describe``)."""
    return describe_allocator(result.allocator)


def turned_off(result: CellResult) -> str | None:
    """What the cell's strategies turned off that the config asked for (a strategy's
    ``turned_off`` fact, e.g. optimizer-in-backward's gradient clipping), one per line."""
    return "\n".join((result.strategy_facts or {}).get("turned_off", [])) or None


def model_notes(result: CellResult) -> str | None:
    """What loading did to the model (random init from a config, weights newly initialised
    or ignored), as the loader worded it (``modeling.LoadReport.notes``)."""
    return "\n".join((result.model or {}).get("load_notes", [])) or None


def build_frame(results: list[CellResult], baseline: str = "baseline") -> tuple[pd.DataFrame, MemoryMeasure]:
    """One row per cell with every measured field and the comparisons against ``baseline``."""
    measure = memory_measure(results)
    accuracy = results_metrics(results)
    frame = pd.DataFrame([_row(result) for result in results]).reindex(columns=list(frame_columns(accuracy)))
    # (Not a number: the extrapolation flag, and the segments' list of [MiB, count] pairs.)
    numeric = [c for c in (*DERIVED_COLUMNS, *METRIC_COLUMNS, *BREAKDOWN_COLUMNS)
               if c not in (EPOCH_TIME_EXTRAPOLATED.name, RESERVED_SEGMENTS.name)]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce").astype("float64")
    frame[MEMORY.name] = frame[measure.metric]
    spread = [(result.memory_per_rank or {}).get(measure.metric, {}) for result in results]
    frame[MEMORY_RANK_MEAN.name] = [entry.get("mean", math.nan) for entry in spread]
    frame[MEMORY_ALL_RANKS.name] = [entry.get("total", math.nan) for entry in spread]
    base = frame[(frame["cell"] == baseline) & (frame["status"] == "ok")]
    if not base.empty:
        reference = base.iloc[0]
        frame[MEMORY_X_BASELINE.name] = frame[MEMORY.name] / reference[MEMORY.name]
        frame[EPOCH_X_BASELINE.name] = frame[EPOCH_SECONDS.name] / reference[EPOCH_SECONDS.name]
        for delta, of in DELTA_OF.items():
            frame[delta.name] = 100 * (frame[of.name] - reference[of.name])
    failed = ~frame["status"].isin(TRAINED_STATUSES)
    frame.loc[failed, list(numeric)] = float("nan")  # a failed cell's partial figures are not comparable
    on_frontier = set(pareto_cells(frame))
    frame["pareto"] = frame["cell"].isin(on_frontier)
    reference_result = next((r for r in results if r.cell == baseline and r.ok), None)
    judged = (measure.metric, EPOCH_SECONDS.name, *(metric.name for metric in accuracy.compared))
    for column, metric in zip(verdict_columns(accuracy), judged):
        frame[column] = [_verdict(result, reference_result, metric) for result in results]
    return frame, measure


def _verdict(result: CellResult, reference: CellResult | None, metric: str) -> str | None:
    """How ``result`` stands against the baseline on ``metric``, judged by the repeats' spread."""
    if reference is None or result is reference or not result.ok:
        return None
    mine, theirs = result.statistics(metric), reference.statistics(metric)
    if mine is None or theirs is None:
        return None
    return versus(mine, theirs)


def pareto_cells(frame: pd.DataFrame) -> list[str]:
    """The finished cells no other beats on both memory and time per epoch, smallest first."""
    trained = frame[frame["status"].isin(TRAINED_STATUSES)]
    return frontier(zip(trained["cell"], trained[MEMORY.name], trained[EPOCH_SECONDS.name]))


