"""The catalogue of metrics: every figure a result holds or the report derives, declared once.

In: nothing (a foundation module: no torch, no pandas, so that the worker, the runner, the
estimator, the report and the front ends can all read it). Out: ``Metric`` declarations,
the accuracy metrics of each task (``TaskMetrics``), and the memory categories
(``MemoryCategory``) in the one order every reader uses.

A metric's declaration says its name (the key of a result's ``metrics`` and the report's
column), its unit, which way is better, how a torchrun cell's ranks merge it, the tasks it
applies to, and its labels where a reader shows it. Readers take names from here instead of
spelling them: ``EPOCH_SECONDS.name``, never ``"epoch_seconds"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable

# --------------------------------------------------------------------------- what a metric is

#: The tasks a model is trained on, as ``modeling`` names them (``MLM``, ``CLM``) and a result
#: file records them under ``model.task``.
MASKED_LM = "mlm"
CAUSAL_LM = "clm"
BOTH_TASKS = frozenset({MASKED_LM, CAUSAL_LM})
MASKED_LM_ONLY = frozenset({MASKED_LM})
CAUSAL_LM_ONLY = frozenset({CAUSAL_LM})


class Direction(Enum):
    """Which way is better: what the tables colour and report.json lists."""

    LOWER = "lower is better"
    HIGHER = "higher is better"
    #: Not a figure cells are ranked by: a count, a flag, a diagnostic, or a raw reading that
    #: the headline figure (``memory_mib``) stands for.
    UNRANKED = "not ranked"


class RankMerge(Enum):
    """How a torchrun cell's per-rank results become one figure (``results.merge_ranks``)."""

    #: Per-process memory: the largest rank's (what must fit on each GPU), with the mean and
    #: the total over ranks kept in ``memory_per_rank``.
    LARGEST = "the largest rank's; mean and total kept beside it"
    #: The lowest rank's: ranks step in lockstep, and every rank evaluates the whole eval set.
    LOWEST_RANK = "the lowest rank's"
    #: The lowest rank's, which already counts every rank's samples: each rank walks every
    #: batch and takes its share. Only the method says so.
    LOWEST_RANK_ALL_SAMPLES = "the lowest rank's, counting the samples of all ranks"
    #: Not in a result: the report derives it from merged figures.
    DERIVED = "derived by the report after the ranks are merged"


@dataclass(frozen=True)
class Labels:
    """How the tables, the comparison and the plots name a metric they show."""

    terminal: str  # the terminal table's header (short)
    markdown: str  # report.md's header
    long: str  # the HTML table's header, compare's figure, a plot's subject
    abbreviation: str  # compare's header stem: "masked A", "masked B"
    axis: str  # a plot's axis


@dataclass(frozen=True)
class Metric:
    """One figure: measured by a worker and stored in a result, or derived by the report."""

    name: str
    unit: str
    direction: Direction
    ranks: RankMerge
    tasks: frozenset[str]
    #: Only for a metric a table, compare or a plot labels by name; None for the rest.
    labels: Labels | None

    @property
    def shown_as(self) -> Labels:
        """Its labels, for a reader that shows it by name: such a metric must declare them."""
        if self.labels is None:
            raise LookupError(f"metric '{self.name}' is shown by name but the catalogue gives it no labels")
        return self.labels

    @property
    def is_fraction(self) -> bool:
        """Shown as a percentage (an accuracy), compared in points."""
        return self.unit == "fraction"

    @property
    def stem(self) -> str:
        """The name without ``eval_``: what the comparison's and the verdicts' columns start with."""
        return self.name.removeprefix("eval_")

    @property
    def versus_baseline(self) -> str:
        """The frame's column for its verdict against the baseline, judged from the repeats."""
        return f"{self.stem}_vs_baseline"


# Short names for the declarations below only.
_L, _H, _U = Direction.LOWER, Direction.HIGHER, Direction.UNRANKED
_LARGEST, _LOWEST, _DERIVED = RankMerge.LARGEST, RankMerge.LOWEST_RANK, RankMerge.DERIVED

# --------------------------------------------------------------------------- measured: in a result

# Per-process memory: what a torchrun cell merges as max / mean / total over ranks.
PEAK_ALLOCATED = Metric("peak_allocated_mib", "MiB", _U, _LARGEST, BOTH_TASKS, None)
PEAK_RESERVED = Metric("peak_reserved_mib", "MiB", _U, _LARGEST, BOTH_TASKS, None)
NVML_PROCESS_PEAK = Metric("nvml_process_peak_mib", "MiB", _U, _LARGEST, BOTH_TASKS, None)
TRACKED_PEAK = Metric("tracked_peak_mib", "MiB", _U, _LARGEST, BOTH_TASKS, None)
TRACKED_HOST_PEAK = Metric("tracked_host_peak_mib", "MiB", _U, _LARGEST, BOTH_TASKS, None)
PEAK_RSS = Metric("peak_rss_mib", "MiB", _U, _LARGEST, BOTH_TASKS, None)
#: CUDA only: the caching allocator's reserved segments at the end of the training loop, as
#: ``[size_mib, count]`` pairs, largest first (a list, not a number), and the largest one's size.
RESERVED_SEGMENTS = Metric("reserved_segments", "[MiB, count] pairs", _U, _LOWEST, BOTH_TASKS, None)
LARGEST_SEGMENT = Metric("largest_segment_mib", "MiB", _U, _LOWEST, BOTH_TASKS, None)
# Time.
EPOCH_SECONDS = Metric("epoch_seconds", "s", _L, _LOWEST, BOTH_TASKS, None)
EPOCH_TIME_EXTRAPOLATED = Metric("epoch_time_extrapolated", "bool", _U, _LOWEST, BOTH_TASKS, None)
SAMPLES_PER_SECOND = Metric("samples_per_second", "samples/s", _H, RankMerge.LOWEST_RANK_ALL_SAMPLES, BOTH_TASKS, None)
MEAN_STEP_SECONDS = Metric("mean_step_seconds", "s", _U, _LOWEST, BOTH_TASKS, None)
FIRST_STEP_SECONDS = Metric("first_step_seconds", "s", _U, _LOWEST, BOTH_TASKS, None)
TRACKED_STEP_SECONDS = Metric("tracked_step_seconds", "s", _U, _LOWEST, BOTH_TASKS, None)
CELL_SECONDS = Metric("cell_seconds", "s", _U, _LOWEST, BOTH_TASKS, None)
COMPILE_SECONDS = Metric("compile_seconds", "s", _U, _LOWEST, BOTH_TASKS, None)
# The run itself.
STEPS_RUN = Metric("steps_run", "steps", _U, _LOWEST, BOTH_TASKS, None)
NONFINITE_LOSS_STEPS = Metric("nonfinite_loss_steps", "steps", _U, _LOWEST, BOTH_TASKS, None)
#: paged-adam8bit's state in CUDA unified memory: outside the allocator's figures. Not merged
#: as memory is: it is the lowest rank's, as it always was.
PAGED_OPTIMIZER_STATE = Metric("paged_optimizer_state_mib", "MiB", _U, _LOWEST, BOTH_TASKS, None)
# Evaluation: a masked-LM's, then a causal LM's, then both's.
MASKED_ACCURACY = Metric(
    "eval_masked_accuracy", "fraction", _H, _LOWEST, MASKED_LM_ONLY,
    Labels("masked acc", "eval accuracy, masked", "masked accuracy", "masked", "eval accuracy at masked positions (%)"),
)
TOKEN_ACCURACY = Metric(
    "eval_token_accuracy", "fraction", _H, _LOWEST, MASKED_LM_ONLY,
    Labels("token acc (seed)", "token accuracy, seed's", "token accuracy (seed's)", "token",
           "eval accuracy over all real tokens (%)"),
)
NEXT_TOKEN_ACCURACY = Metric(
    "eval_next_token_accuracy", "fraction", _H, _LOWEST, CAUSAL_LM_ONLY,
    Labels("next-token acc", "eval accuracy, next token", "next-token accuracy", "next-token",
           "eval accuracy at the next token (%)"),
)
PERPLEXITY = Metric(
    "eval_perplexity", "perplexity", _L, _LOWEST, CAUSAL_LM_ONLY,
    Labels("perplexity", "eval perplexity", "perplexity", "ppl", "eval perplexity"),
)
EVAL_LOSS = Metric("eval_loss", "nats/token", _L, _LOWEST, BOTH_TASKS, None)
FINAL_TRAIN_LOSS = Metric("final_train_loss", "nats/token", _L, _LOWEST, BOTH_TASKS, None)

#: Every metric a worker records, in the report's column order.
MEASURED: tuple[Metric, ...] = (
    PEAK_ALLOCATED, PEAK_RESERVED, NVML_PROCESS_PEAK, TRACKED_PEAK, TRACKED_HOST_PEAK, PEAK_RSS,
    RESERVED_SEGMENTS, LARGEST_SEGMENT, EPOCH_SECONDS, EPOCH_TIME_EXTRAPOLATED, SAMPLES_PER_SECOND, MEAN_STEP_SECONDS, FIRST_STEP_SECONDS,
    TRACKED_STEP_SECONDS, CELL_SECONDS, COMPILE_SECONDS, STEPS_RUN, NONFINITE_LOSS_STEPS, PAGED_OPTIMIZER_STATE,
    MASKED_ACCURACY, TOKEN_ACCURACY, NEXT_TOKEN_ACCURACY, PERPLEXITY, EVAL_LOSS, FINAL_TRAIN_LOSS,
)

# --------------------------------------------------------------------------- derived: by the report

#: The run's headline memory figure (NVML's on CUDA, the tensor peak on CPU: ``report.frame.memory_measure``).
MEMORY = Metric("memory_mib", "MiB", _L, _DERIVED, BOTH_TASKS, None)
MEMORY_RANK_MEAN = Metric("memory_rank_mean_mib", "MiB", _U, _DERIVED, BOTH_TASKS, None)
MEMORY_ALL_RANKS = Metric("memory_all_ranks_mib", "MiB", _U, _DERIVED, BOTH_TASKS, None)
MEMORY_X_BASELINE = Metric("memory_x_baseline", "ratio", _L, _DERIVED, BOTH_TASKS, None)
EPOCH_X_BASELINE = Metric("epoch_x_baseline", "ratio", _L, _DERIVED, BOTH_TASKS, None)
MASKED_ACCURACY_DELTA = Metric("masked_accuracy_delta_points", "points", _H, _DERIVED, MASKED_LM_ONLY, None)
#: The seed's all-token accuracy mostly counts tokens copied through, so its change is shown
#: beside the masked one but ranks nothing.
TOKEN_ACCURACY_DELTA = Metric("token_accuracy_delta_points", "points", _U, _DERIVED, MASKED_LM_ONLY, None)
NEXT_TOKEN_ACCURACY_DELTA = Metric("next_token_accuracy_delta_points", "points", _H, _DERIVED, CAUSAL_LM_ONLY, None)

#: Every metric the report derives, in its column order.
DERIVED_METRICS: tuple[Metric, ...] = (
    MEMORY, MEMORY_RANK_MEAN, MEMORY_ALL_RANKS, MEMORY_X_BASELINE, EPOCH_X_BASELINE,
    MASKED_ACCURACY_DELTA, TOKEN_ACCURACY_DELTA, NEXT_TOKEN_ACCURACY_DELTA,
)

#: The accuracy each accuracy-in-points column is the change of.
DELTA_OF: dict[Metric, Metric] = {
    MASKED_ACCURACY_DELTA: MASKED_ACCURACY,
    TOKEN_ACCURACY_DELTA: TOKEN_ACCURACY,
    NEXT_TOKEN_ACCURACY_DELTA: NEXT_TOKEN_ACCURACY,
}


def _by_name(metrics: tuple[Metric, ...]) -> dict[str, Metric]:
    by_name: dict[str, Metric] = {}
    for metric in metrics:
        if metric.name in by_name:  # a second declaration would let two readers disagree
            raise ValueError(f"metric '{metric.name}' is declared twice")
        by_name[metric.name] = metric
    return by_name


#: Every metric by name: one declaration each.
CATALOGUE: dict[str, Metric] = _by_name((*MEASURED, *DERIVED_METRICS))


def merged_as(ranks: RankMerge) -> tuple[Metric, ...]:
    """The measured metrics a torchrun cell merges in the way ``ranks`` says, in column order."""
    return tuple(item for item in MEASURED if item.ranks is ranks)


def ranked(direction: Direction) -> tuple[Metric, ...]:
    """Every metric whose ``direction`` is the one given."""
    return tuple(item for item in (*MEASURED, *DERIVED_METRICS) if item.direction is direction)


# --------------------------------------------------------------------------- a task's accuracy


@dataclass(frozen=True)
class TaskMetrics:
    """What the accuracy columns of every reader show for a task."""

    task: str
    #: The headline accuracy: its column, its change in points against the baseline.
    accuracy: Metric
    delta: Metric
    #: The figure beside it: a masked-LM's the seed's token accuracy, a causal LM's perplexity.
    second: Metric
    #: Judged against the baseline's repeats, compared between runs and plotted over repeats.
    compared: tuple[Metric, ...]
    #: The accuracy plot's title, before the run's name.
    repeats_title: str

    @property
    def shown(self) -> tuple[Metric, ...]:
        """The accuracy metrics a table shows: the headline and the figure beside it."""
        return (self.accuracy, self.second)


MASKED_LM_METRICS = TaskMetrics(
    MASKED_LM, MASKED_ACCURACY, MASKED_ACCURACY_DELTA, TOKEN_ACCURACY, (MASKED_ACCURACY,),
    "Masked-token accuracy over repeats",
)
CAUSAL_LM_METRICS = TaskMetrics(
    CAUSAL_LM, NEXT_TOKEN_ACCURACY, NEXT_TOKEN_ACCURACY_DELTA, PERPLEXITY, (NEXT_TOKEN_ACCURACY, PERPLEXITY),
    "Next-token accuracy and perplexity over repeats",
)
TASK_METRICS: dict[str, TaskMetrics] = {MASKED_LM: MASKED_LM_METRICS, CAUSAL_LM: CAUSAL_LM_METRICS}
#: What a result written before causal LMs were supported trained: a masked-LM.
TASK_BEFORE_CAUSAL_LMS = MASKED_LM


def task_metrics(tasks: Iterable[str | None]) -> TaskMetrics:
    """The accuracy metrics of a run whose cells trained ``tasks`` (None for a cell that never
    recorded one): a run trains one model, so one task; any causal LM cell makes it a causal LM's."""
    return CAUSAL_LM_METRICS if CAUSAL_LM in set(tasks) else MASKED_LM_METRICS


# --------------------------------------------------------------------------- memory categories


class Role(Enum):
    """What a category is to a traced step (``estimator.trace``)."""

    #: The model's own state: what an offload moves to the host.
    STATE = "state"
    #: What a step adds to the state: activations, temporaries and the rest.
    TRANSIENT = "transient"
    #: Counted in neither sum: buffers, and qlora's 4-bit weights.
    NEITHER = "neither"


@dataclass(frozen=True)
class MemoryCategory:
    """One category of live tensor bytes, as MemTracker sees them and every reader shows them."""

    name: str
    #: MemTracker's reference type that ``measure.tracker`` renames to ``name``; None for a
    #: category this package splits off itself.
    memtracker: str | None
    role: Role
    #: The estimate table's header; None when the estimate table does not show it.
    estimate_header: str | None
    #: The breakdown chart's legend; None when the chart folds it into ``other``.
    chart_label: str | None
    #: The estimate table shows its column only when a setup has such bytes (qlora's 4-bit
    #: weights, FSDP's gathered units, DDP's buckets): other tables stay as they were.
    shown_when_present: bool = False
    #: ``FSDPMemTracker``'s reference types filed under it (the estimate traces FSDP cells with it).
    fsdp_memtracker: tuple[str, ...] = ()


PARAMETERS = MemoryCategory("parameters", "Parameter", Role.STATE, "params", "parameters",
                            fsdp_memtracker=("Sharded Param",))
#: qlora's frozen base: the packed uint8 storage and its quantisation constants, moved out of
#: ``parameters`` (and the constants out of ``other``) by ``measure.tracker``.
QUANTIZED_WEIGHTS = MemoryCategory("quantized_weights", None, Role.NEITHER, "4-bit",
                                   "4-bit weights\n(+ quant. constants)", shown_when_present=True)
BUFFERS = MemoryCategory("buffers", "Buffer", Role.NEITHER, None, None, fsdp_memtracker=("Buffer",))
GRADIENTS = MemoryCategory("gradients", "Gradient", Role.STATE, "grads", "gradients", fsdp_memtracker=("Sharded Grad",))
OPTIMIZER_STATE = MemoryCategory("optimizer_state", "Optstate", Role.STATE, "optim", "optimizer state",
                                 fsdp_memtracker=("OptState",))
#: FSDP's units in flight on a rank: the all-gathered (unsharded) weights of the running and
#: prefetched layers and of the root, their full-size gradients before the reduce-scatter, and
#: the collectives' buffers. Never mixed into the sharded parameters, gradients or optimizer state.
GATHERED = MemoryCategory("gathered", None, Role.TRANSIENT, "gathered", None, shown_when_present=True,
                          fsdp_memtracker=("Unsharded Param", "Unsharded Grad", "All Gather", "Reduce Scatter"))
#: DDP's gradient buckets: a flat copy of every trained gradient, made when the model is wrapped
#: and all-reduced in backward (counted by the estimate from the trained shapes).
GRADIENT_BUCKETS = MemoryCategory("gradient_buckets", None, Role.NEITHER, "buckets", None, shown_when_present=True)
ACTIVATIONS = MemoryCategory("activations", "Activation", Role.TRANSIENT, "activ", "activations",
                             fsdp_memtracker=("Activation", "Inputs"))
TEMPORARIES = MemoryCategory("temporaries", "Temp", Role.TRANSIENT, "temp", "temporaries", fsdp_memtracker=("Temp",))
OTHER = MemoryCategory("other", "Other", Role.TRANSIENT, None, "buffers + other", fsdp_memtracker=("Other",))

#: Every category, in the order the report's columns and the breakdown chart's stack use.
MEMORY_CATEGORIES: tuple[MemoryCategory, ...] = (
    PARAMETERS, QUANTIZED_WEIGHTS, BUFFERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, TEMPORARIES, OTHER,
    GATHERED, GRADIENT_BUCKETS,
)


def categories_in(role: Role) -> tuple[str, ...]:
    """The names of the categories that play ``role``, in order."""
    return tuple(category.name for category in MEMORY_CATEGORIES if category.role is role)
