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

from ..results import MEMORY_METRICS, TRAINED_STATUSES, CellResult
from ..stats import versus
from ..units import MIB, format_gib
from .pareto import frontier

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
    "eval_next_token_accuracy",
    "eval_perplexity",
    "eval_loss",
    "final_train_loss",
)
#: MemTracker's categories, and qlora's 4-bit weights (absent, so empty, in every other cell).
CATEGORIES = ("parameters", "quantized_weights", "buffers", "gradients", "optimizer_state", "activations", "temporaries",
              "other")
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
    "next_token_accuracy_delta_points",
)
OOM_COLUMNS = ("oom_requested_mib", "oom_in_use_mib", "gpu_memory_limit_mib")
INFO_COLUMNS = (
    "pareto", "world_size", "device_type", "device_name", "compute_dtype", "optimizer", "trainable_parameters",
    "total_parameters", "preset", "objective", "attention", "memory_snapshot", "corpus_source",
    "train_sentences_repeated", "task", "architecture", "model_parameters", "model_notes",
)
COLUMNS = (
    "cell", "strategies", "status", "reason", "repeats",
    *DERIVED_COLUMNS, *VERDICT_COLUMNS, *METRIC_COLUMNS, *BREAKDOWN_COLUMNS, *OOM_COLUMNS, *INFO_COLUMNS,
)

#: Which way is better, for colouring and for readers of the CSV.
LOWER_IS_BETTER = {"memory_mib", "memory_x_baseline", "epoch_seconds", "epoch_x_baseline", "eval_loss", "final_train_loss",
                   "eval_perplexity"}
HIGHER_IS_BETTER = {"eval_masked_accuracy", "eval_token_accuracy", "masked_accuracy_delta_points", "samples_per_second",
                    "eval_next_token_accuracy", "next_token_accuracy_delta_points"}


@dataclass(frozen=True)
class AccuracyColumns:
    """What the accuracy columns of every table show: a masked-LM's masked and all-token
    accuracy, or a causal LM's next-token accuracy and perplexity."""

    task: str
    accuracy: str  # the headline accuracy's column, compared with the baseline in points
    delta: str
    second: str  # the second figure's column
    #: Headers: (terminal, markdown, HTML) for the accuracy, then for the second figure.
    accuracy_labels: tuple[str, str, str]
    second_labels: tuple[str, str, str]
    second_is_fraction: bool


MASKED_LM_COLUMNS = AccuracyColumns(
    "mlm", "eval_masked_accuracy", "masked_accuracy_delta_points", "eval_token_accuracy",
    ("masked acc", "eval accuracy, masked", "masked accuracy"),
    ("token acc (seed)", "token accuracy, seed's", "token accuracy (seed's)"), True,
)
CAUSAL_LM_COLUMNS = AccuracyColumns(
    "clm", "eval_next_token_accuracy", "next_token_accuracy_delta_points", "eval_perplexity",
    ("next-token acc", "eval accuracy, next token", "next-token accuracy"),
    ("perplexity", "eval perplexity", "perplexity"), False,
)


def accuracy_columns(frame: pd.DataFrame) -> AccuracyColumns:
    """The columns for the run's task (a run trains one model, so one task)."""
    return CAUSAL_LM_COLUMNS if "task" in frame and frame["task"].eq("clm").any() else MASKED_LM_COLUMNS


@dataclass(frozen=True)
class MemoryMeasure:
    """The headline memory figure: the seed's nvidia-smi number on CUDA, the tensor peak on CPU."""

    metric: str
    label: str


CPU_MEASURE = MemoryMeasure("tracked_peak_mib", "tensor peak (CPU)")
NVML_MEASURE = MemoryMeasure("nvml_process_peak_mib", "GPU memory (NVML)")
RESERVED_MEASURE = MemoryMeasure("peak_reserved_mib", "GPU memory (reserved)")


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
        # Results written before causal LMs were supported trained a masked-LM.
        task=(result.model or {}).get("task", "mlm") if result.model else None,
        architecture=(result.model or {}).get("architecture"),
        model_parameters=(result.model or {}).get("parameters"),
        model_notes=model_notes(result),
    )
    return row


def model_notes(result: CellResult) -> str | None:
    """What loading did to the model (random init from a config, weights newly initialised
    or ignored), as the loader worded it (``modeling.LoadReport.notes``)."""
    return "\n".join((result.model or {}).get("load_notes", [])) or None


def build_frame(results: list[CellResult], baseline: str = "baseline") -> tuple[pd.DataFrame, MemoryMeasure]:
    """One row per cell with every measured field and the comparisons against ``baseline``."""
    measure = memory_measure(results)
    frame = pd.DataFrame([_row(result) for result in results]).reindex(columns=list(COLUMNS))
    numeric = [c for c in (*DERIVED_COLUMNS, *METRIC_COLUMNS, *BREAKDOWN_COLUMNS) if c != "epoch_time_extrapolated"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce").astype("float64")
    frame["memory_mib"] = frame[measure.metric]
    spread = [(result.memory_per_rank or {}).get(measure.metric, {}) for result in results]
    frame["memory_rank_mean_mib"] = [entry.get("mean", math.nan) for entry in spread]
    frame["memory_all_ranks_mib"] = [entry.get("total", math.nan) for entry in spread]
    base = frame[(frame["cell"] == baseline) & (frame["status"] == "ok")]
    if not base.empty:
        reference = base.iloc[0]
        frame["memory_x_baseline"] = frame["memory_mib"] / reference["memory_mib"]
        frame["epoch_x_baseline"] = frame["epoch_seconds"] / reference["epoch_seconds"]
        frame["masked_accuracy_delta_points"] = 100 * (frame["eval_masked_accuracy"] - reference["eval_masked_accuracy"])
        frame["token_accuracy_delta_points"] = 100 * (frame["eval_token_accuracy"] - reference["eval_token_accuracy"])
        frame["next_token_accuracy_delta_points"] = 100 * (
            frame["eval_next_token_accuracy"] - reference["eval_next_token_accuracy"])
    failed = ~frame["status"].isin(TRAINED_STATUSES)
    frame.loc[failed, list(numeric)] = float("nan")  # a failed cell's partial figures are not comparable
    on_frontier = set(pareto_cells(frame))
    frame["pareto"] = frame["cell"].isin(on_frontier)
    reference = next((r for r in results if r.cell == baseline and r.ok), None)
    accuracy = accuracy_columns(frame).accuracy
    for column, metric in zip(VERDICT_COLUMNS, (measure.metric, "epoch_seconds", accuracy)):
        frame[column] = [_verdict(result, reference, metric) for result in results]
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
    return frontier(zip(trained["cell"], trained["memory_mib"], trained["epoch_seconds"]))


