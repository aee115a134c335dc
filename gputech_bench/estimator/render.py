"""The estimate as text: its file (estimate.json), markdown, JSON, and the cells of its table
(categories, overheads, total, fits, and measured where known) that ``cli.tables`` lays out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..files import atomic_write_bytes
from ..metrics import GATHERED, MEMORY_CATEGORIES, QUANTIZED_WEIGHTS, MemoryCategory
from ..results import RunFolder
from ..units import MIB, format_gib
from .measured import Measured, error_percent
from .overheads import Overheads
from .predict import Prediction
from .trace import is_stand_in

SCHEMA = "gputech-bench/estimate/1"


def _column(category: MemoryCategory) -> tuple[str, str]:
    """A category's (name, header) in the estimate table."""
    if category.estimate_header is None:
        raise ValueError(f"memory category '{category.name}' has no header for the estimate table")
    return category.name, category.estimate_header


#: Category columns (name, header), in the order memory is usually explained.
SHOWN_CATEGORIES = tuple(_column(category) for category in MEMORY_CATEGORIES
                         if category.estimate_header is not None and not category.shown_when_present)
#: Shown only when a setup has them (qlora's packed 4-bit weights and their constants), last.
QUANTIZED = _column(QUANTIZED_WEIGHTS)
#: Every column shown only when a setup has it: 4-bit weights, FSDP's gathered units, DDP's buckets.
WHEN_PRESENT = tuple(_column(category) for category in MEMORY_CATEGORIES if category.shown_when_present)


@dataclass(frozen=True)
class EstimateReport:
    target: str
    caveat: str | None
    predictions: list[Prediction]
    overheads: Overheads
    budget_bytes: int | None = None
    measured: dict[str, Measured] = field(default_factory=dict)
    #: The training objective whose batches were traced (data.objective); None in files
    #: written before the setting existed.
    objective: str | None = None
    #: The attention kernel of the traced model (model.attention); None in older files.
    attention: str | None = None
    #: The shape fields that overrode the traced --model's config (``model.num_layers=4``).
    model_overrides: tuple[str, ...] = ()
    #: The ranks each cell runs on; above 1 every figure is one rank's (rank 0's).
    world_size: int = 1

    @property
    def per_rank(self) -> str:
        """'' on one rank, else how the table says its figures are one rank's ("per rank of 8")."""
        return f"per rank of {self.world_size}" if self.world_size > 1 else ""

    def row(self, prediction: Prediction) -> dict[str, Any]:
        device = prediction.device
        row: dict[str, Any] = {"setup": prediction.setup.label, "cell": prediction.setup.cell, "error": prediction.error,
                               "source": prediction.source, "modelled": prediction.modelled, "stopped": prediction.stopped}
        for category, _ in (*SHOWN_CATEGORIES, *WHEN_PRESENT):
            row[f"{category}_mib"] = device.by_category.get(category, 0) / MIB
        row["tensor_peak_mib"] = device.total_bytes / MIB
        # Where the overheads judge tensors by the flat fraction alone, no replay stands in the row.
        replayed = prediction.reserved if self.overheads.replayed else None
        low, high = self.overheads.reserved_range(device.total_bytes, replayed)
        total = high + self.overheads.context_bytes
        row["reserved_low_mib"], row["reserved_high_mib"] = low / MIB, high / MIB
        row["reserved_source"] = "replayed" if replayed is not None else "flat"
        row["allocator_reserve_low_mib"] = (low - device.total_bytes) / MIB
        row["allocator_reserve_mib"] = (high - device.total_bytes) / MIB
        row["allocator_note"] = replayed.why if replayed is not None else prediction.reserved_note
        row["reserved_segments"] = None if replayed is None else [[size / MIB, count] for size, count in replayed.segments]
        row["cuda_context_mib"] = self.overheads.context_bytes / MIB
        row["device_total_low_mib"] = (low + self.overheads.context_bytes) / MIB
        row["device_total_mib"] = total / MIB
        row["host_peak_mib"] = None if prediction.host is None else prediction.host.total_bytes / MIB
        row["fits"] = None if self.budget_bytes is None or prediction.error else total <= self.budget_bytes
        measured = self.measured.get(prediction.setup.cell)
        if measured is not None and not prediction.error:
            row["measured_mib"] = None if measured.bytes is None else measured.bytes / MIB
            row["measured_what"] = measured.what
            row["error_percent"] = error_percent(device.total_bytes, measured)
        row["trace_seconds"] = prediction.trace_seconds
        return row

    def rows(self) -> list[dict[str, Any]]:
        return [self.row(prediction) for prediction in self.predictions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "target": self.target,
            "caveat": self.caveat,
            "objective": self.objective,
            "attention": self.attention,
            "model_overrides": list(self.model_overrides),
            "world_size": self.world_size,
            "budget_bytes": self.budget_bytes,
            "overheads": {
                "cuda_context_bytes": self.overheads.context_bytes,
                "cuda_context_source": self.overheads.context_source,
                "allocator_reserve_fraction": self.overheads.reserve_fraction,
                "allocator_reserve_source": self.overheads.reserve_source,
            },
            "predictions": [prediction.to_dict() for prediction in self.predictions],
            "rows": self.rows(),
        }


def from_dict(data: dict[str, Any]) -> EstimateReport:
    if data.get("schema") != SCHEMA:
        raise ValueError(f"not an estimate file (schema {data.get('schema')!r})")
    overheads = data["overheads"]
    return EstimateReport(
        data["target"],
        data.get("caveat"),
        [Prediction.from_dict(item) for item in data["predictions"]],
        Overheads(
            int(overheads["cuda_context_bytes"]), overheads["cuda_context_source"],
            float(overheads["allocator_reserve_fraction"]), overheads["allocator_reserve_source"],
        ),
        data.get("budget_bytes"),
        objective=data.get("objective"),
        attention=data.get("attention"),
        model_overrides=tuple(data.get("model_overrides", ())),
        world_size=int(data.get("world_size") or 1),
    )


def write_estimate(folder: RunFolder, report: EstimateReport) -> Path:
    """The estimate beside the run's results, for ``report`` and the plots to show again."""
    atomic_write_bytes(folder.estimate_path, to_json(report).encode("utf-8"))
    return folder.estimate_path


def read_estimate(folder: RunFolder) -> EstimateReport:
    """The run's saved estimate; raises OSError or ValueError when it is missing or unreadable."""
    return from_dict(json.loads(folder.estimate_path.read_text(encoding="utf-8")))


def mib_text(value: float | None) -> str:
    """MiB as a whole number; below 1 MiB with two decimals, so that what is there never reads as 0."""
    if value is None:
        return "-"
    return f"{value:.2f}" if 0 < value < 1 else f"{value:,.0f}"


def range_text(low: float | None, high: float | None) -> str:
    """One figure, or ``low-high`` where the allocator may hold one segment more or less."""
    if low is None or high is None or round(low) == round(high):
        return mib_text(high)
    return f"{mib_text(low)}-{mib_text(high)}"


def _plain_fits(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def categories(report: EstimateReport) -> tuple[tuple[str, str], ...]:
    """The category columns: the usual five, then 4-bit weights, FSDP's gathered units and DDP's
    gradient buckets, each when a setup has them."""
    present = tuple(column for column in WHEN_PRESENT
                    if any(p.device.by_category.get(column[0]) for p in report.predictions))
    return (*SHOWN_CATEGORIES, *present)


def numbered_methods(predictions: Iterable[Prediction], first: int = 1) -> dict[str, int]:
    """Each distinct way a figure was modelled, numbered from ``first`` for footnotes (plain
    numbers: rich would read "[m1]" as markup and drop it)."""
    methods: dict[str, int] = {}
    for prediction in predictions:
        if prediction.modelled and not prediction.error and prediction.modelled not in methods:
            methods[prediction.modelled] = first + len(methods)
    return methods


def modelled_methods(report: EstimateReport) -> dict[str, int]:
    """The report's modelling methods, numbered after its untraced reasons."""
    return numbered_methods(report.predictions, len(untraced_reasons(report)) + 1)


def has_source_column(report: EstimateReport) -> bool:
    """Only where some figure is not plainly traced: every other table stays as it was."""
    return bool(modelled_methods(report))


def method_word(method: str | None) -> str:
    """A figure's source in one word: stand-in (traced under the estimate's own autocast
    rules), modelled (around a trace), or traced."""
    if not method:
        return "traced"
    return "stand-in" if is_stand_in(method) else "modelled"


def source_text(report: EstimateReport, row: dict[str, Any]) -> str:
    if row.get("modelled"):
        return f"{method_word(row['modelled'])} [{modelled_methods(report)[row['modelled']]}]"
    return "traced"


def row_cells(report: EstimateReport, row: dict[str, Any], compared: bool, fits: Callable[[bool | None], str]) -> list[str]:
    """One traced row's cells, in the column order both the table and the markdown use."""
    cells = [row["setup"]]
    if has_source_column(report):
        cells.append(source_text(report, row))
    cells += [mib_text(row[f"{category}_mib"]) for category, _ in categories(report)]
    cells += [mib_text(row["tensor_peak_mib"]),
              range_text(row.get("allocator_reserve_low_mib"), row["allocator_reserve_mib"]), mib_text(row["cuda_context_mib"])]
    cells += [range_text(row.get("device_total_low_mib"), row["device_total_mib"]), mib_text(row["host_peak_mib"])]
    if report.budget_bytes is not None:
        cells.append(fits(row["fits"]))
    if compared:
        measured = row.get("measured_mib")
        cells += [mib_text(measured) if measured is not None else row.get("measured_what", "-"), error_text(row.get("error_percent"))]
    return cells


def error_text(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def untraced_reasons(report: EstimateReport) -> dict[str, int]:
    """Each distinct reason a setup could not be traced, numbered for footnotes."""
    reasons: dict[str, int] = {}
    for row in report.rows():
        if row["error"] and row["error"] not in reasons:
            reasons[row["error"]] = len(reasons) + 1
    return reasons


def untraceable_row(report: EstimateReport, row: dict[str, Any], width: int) -> list[str]:
    """A row for a setup the tracer could not follow: a footnote to its reason, then dashes.
    (Several cells share a reason, such as every amp cell without CUDA.)"""
    return [row["setup"], f"not traced [{untraced_reasons(report)[row['error']]}]", *(["-"] * (width - 2))]


def legend(report: EstimateReport, with_overheads: bool = True) -> list[str]:
    lines = [
        f"traced on {report.target}: one full optimizer step (the second, so optimizer state is live), "
        "peak live tensor bytes by category (torch MemTracker)",
    ]
    if report.world_size > 1 or any(p.device.by_category.get(GATHERED.name) for p in report.predictions):
        lines.append(per_rank_legend(report.world_size))
    if with_overheads:
        lines += reserve_legend(report)
        lines.append(f"+ context: {report.overheads.context_bytes / MIB:,.0f} MiB CUDA context, {report.overheads.context_source}")
    lines.append(
        "host: peak tensor bytes in host memory where the model lives partly there "
        "(strategy 4's fp32 master, its gradients and optimizer state; fsdp-offload's offloaded state; "
        "paged-adam8bit's paged state, modelled) or its saved activations wait there (offload-activations); "
        "- where neither"
    )
    rows = report.rows()
    if any("measured_what" in row for row in rows):
        lines.append("error: tensor peak against the measured peak (allocated on CUDA, MemTracker on CPU)")
    if any(row.get("measured_what") == "MemTracker peak on the CPU" for row in rows):
        lines.append("on CPU: a CPU run's dropout keeps a noise tensor of the input's dtype for backward, where the "
                     "estimate follows a GPU's fused kernel (a 1-byte mask): with dropout, the CPU's figure is higher")
    if any(row.get("measured_what", "").startswith("n/a") for row in rows):
        lines.append("n/a: a CPU run holds the device and host sides (strategy 4, fsdp-offload, offload-activations) in one "
                     "memory, so there is no device peak to compare")
    if report.objective:
        lines.append(f"objective: {report.objective}, traced on the batches a run of it trains on (data.objective)")
    if report.attention:
        lines.append(f"attention: {report.attention} (model.attention)")
    if report.model_overrides:
        lines.append(f"model: config.json overridden by {', '.join(report.model_overrides)}")
    if report.caveat:
        lines.append(f"note: {report.caveat}")
    lines += [f"[{number}] not traced: {reason}" for reason, number in untraced_reasons(report).items()]
    lines += [f"[{number}] {method}" for method, number in modelled_methods(report).items()]
    return lines


def per_rank_legend(world_size: int) -> str:
    """How a per-rank figure was traced, in one line."""
    return (f"per rank of {world_size}: each cell traced as rank 0 of {world_size} in a fake process group "
            "(collectives return at once, no other rank runs), on its share of each batch; fsdp: the "
            "parameters, gradients and optimizer state are its DTensor shards (1/N each, FSDP's padding "
            "included), gathered = the all-gathered units in flight and their full-size gradients "
            "(FSDPMemTracker); any other cell is replicated (DDP): whole state, plus its gradient buckets "
            "(a flat copy of the trained gradients, counted from their shapes); fsdp-offload stays modelled; "
            "where torch has no CUDA, sharded cells run on fake CPU tensors standing in for the GPU (FSDP2 "
            "needs a device mesh, which the meta stand-in cannot have)")


def reserve_legend(report: EstimateReport) -> list[str]:
    """How the reserve column came about, and each setup's reason for a range."""
    replayed = [p for p in report.predictions if p.reserved is not None and not p.error]
    flat = [p for p in report.predictions if p.reserved is None and not p.error]
    lines = []
    if replayed:
        first = replayed[0].reserved
        assert first is not None
        lines.append(
            "+ reserve: what PyTorch's caching allocator holds beyond the tensor peak, from the traced step's "
            "allocations and frees (placement, 3 steps) replayed through a model of the allocator "
            f"({first.settings}; {first.workspaces}); device total is what nvidia-smi will show (a range where one "
            "segment may or may not be needed; a budget is judged against its upper end)"
        )
    if flat:
        names = ", ".join(p.setup.label for p in flat)
        notes = sorted({p.reserved_note for p in flat if p.reserved_note})
        why = "; ".join(notes) if notes else "no allocation sequence was traced (modelled or stopped)"
        lines.append(f"+ reserve for {names}: {report.overheads.reserve_fraction:.0%} of the tensor peak, "
                     f"{report.overheads.reserve_source} ({why})")
    lines += [f"{p.setup.label}: {p.reserved.why}" for p in replayed if p.reserved is not None and p.reserved.why]
    return lines


def markdown(report: EstimateReport) -> str:
    rows = report.rows()
    compared = any("measured_what" in row for row in rows)
    headers = ["setup", *(["figure"] if has_source_column(report) else []),
               *(header for _, header in categories(report)), "tensor peak", "+ reserve", "+ context", "device total", "host"]
    if report.budget_bytes is not None:
        headers.append(f"fits {format_gib(report.budget_bytes)}")
    if compared:
        headers += ["measured", "error"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if row["error"]:
            lines.append("| " + " | ".join(untraceable_row(report, row, len(headers))) + " |")
            continue
        lines.append("| " + " | ".join(row_cells(report, row, compared, _plain_fits)) + " |")
    title = f"Memory in MiB, {report.per_rank}." if report.per_rank else "Memory in MiB."
    return "\n".join([title, "", *lines, "", *(f"- {line}" for line in legend(report))]) + "\n"


def to_json(report: EstimateReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str) + "\n"
