"""The fastest setup predicted to fit a memory budget.

Candidates are every strategy combination the registry allows, and for those with
accumulation every micro-batch size that keeps the effective batch (32 = 16x2, 8x4,
4x8, 2x16). Each trace takes seconds, so the search traces lazily: first the setup
that saves the most (if even that does not fit, nothing does), then candidates from
the fastest down until enough of them fit.

Expected time comes from a measured run when one is given, or else from a cost model,
always labelled as such. The model's factors multiply, relative to the baseline's step:

* checkpointing (1): x 4/3, one more forward pass (a forward is about 1/3 of forward+backward);
* accumulation (2), k micro-batches: x (1 + 0.2 (k - 1)), smaller matmuls and more launches;
  0.2 reproduces the seed's measured 1.6x for 8x4 on an A30;
* 8-bit Adam (3): x 1.0, the optimizer step is small next to forward and backward;
* master copy on the host (4): x 3.8, the seed's measured ratio (host Adam and PCIe copies);
* LoRA: x 0.75, frozen weights need no weight gradients (backward of about one forward);
* amp: x 0.6, half-precision matmuls on tensor cores. An assumption from commonly reported
  BERT-base speed-ups (1.5-2x), not a measurement of this project: a --from run replaces it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import BenchConfig
from ..errors import FitError, StrategyError
from ..results import CellResult
from ..strategies import Cell, combination_refusal, launch_refusal, parse_cell, registered
from ..units import GIB
from .overheads import Overheads
from .predict import Prediction, Setup

#: The effective batch is divided into this many micro-batches (16x2, 8x4, 4x8, 2x16 for 32).
ACCUMULATION_STEPS = (2, 4, 8, 16)
MODEL_FACTORS = {"1": 4 / 3, "3": 1.0, "4": 3.8, "lora": 0.75, "amp": 0.6, "amp-fp16": 0.6}
ACCUMULATION_OVERHEAD = 0.2


def unsearchable(device_type: str) -> list[str]:
    """Strategies the estimate cannot trace on ``device_type`` fake tensors, so fit leaves them out."""
    return [cls.key for cls in registered() if cls.trace_refusal(device_type)]


def candidates(config: BenchConfig, exclude: set[str] = frozenset(), device_type: str = "meta") -> list[Setup]:
    """Every allowed, traceable combination, with each micro-batch size for those that accumulate."""
    strategies = [
        cls for cls in registered()
        if cls.key not in exclude and cls.name not in exclude and not cls.trace_refusal(device_type)
    ]
    batch = config.train.batch_size
    setups: list[Setup] = []
    for size in range(len(strategies) + 1):
        for combo in itertools.combinations(strategies, size):
            cell = Cell(tuple(combo))
            if combination_refusal(cell):
                continue
            micro_sizes: list[int | None] = [None]
            if any(cls.key == "2" for cls in combo):
                micro_sizes = [batch // steps for steps in ACCUMULATION_STEPS if batch % steps == 0]
            for micro in micro_sizes:
                setup = Setup(cell.name, micro)
                try:
                    launch_refusal(cell, setup.config_for(config))
                except StrategyError:
                    continue
                setups.append(setup)
    return setups


def modelled_factor(setup: Setup, config: BenchConfig) -> float:
    """Step time relative to the baseline's, from the cost model in this module's docstring."""
    factor = 1.0
    keys = setup.cell.split("+") if setup.cell != "baseline" else []
    for key in keys:
        if key == "2" and setup.micro_batch_size:
            steps = config.train.batch_size // setup.micro_batch_size
            factor *= 1 + ACCUMULATION_OVERHEAD * (steps - 1)
        else:
            factor *= MODEL_FACTORS.get(key, 1.0)
    return factor


@dataclass(frozen=True)
class ExpectedTime:
    seconds: float | None  # per epoch, when a measured run anchors it
    factor: float  # relative to the baseline
    source: str


def _epoch_seconds(result: CellResult | None) -> float | None:
    """A finished cell's measured time per epoch."""
    value = result.number("epoch_seconds") if result is not None and result.ok else None
    return float(value) if value and value > 0 else None


def expected_time(setup: Setup, config: BenchConfig, measured: dict[str, CellResult], run_micro: int | None) -> ExpectedTime:
    """Measured epoch time of this very setup, else the model scaled by the measured baseline, else the model."""
    factor = modelled_factor(setup, config)
    same_setup = setup.micro_batch_size is None or setup.micro_batch_size == run_micro
    seconds, base = _epoch_seconds(measured.get(setup.cell)), _epoch_seconds(measured.get("baseline"))
    if same_setup and seconds:
        return ExpectedTime(seconds, seconds / base if base else factor, "measured")
    if base:
        return ExpectedTime(base * factor, factor, "model x measured baseline")
    return ExpectedTime(None, factor, "model")


def gives_up(setup: Setup) -> str:
    parts = [cls.gives_up for cls in parse_cell(setup.cell).strategies if cls.gives_up]
    return "; ".join(parts) or "nothing: the same training"


def floor_setup(setups: list[Setup]) -> Setup:
    """The setup that should need the least device memory: the most strategies, the smallest micro-batch."""
    return max(setups, key=lambda s: (len(s.cell.split("+")) if s.cell != "baseline" else 0, -(s.micro_batch_size or 10**9)))


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    time: ExpectedTime
    prediction: Prediction
    device_total: int
    fits: bool


@dataclass(frozen=True)
class FitResult:
    budget: int
    chosen: list[Candidate]  # fitting, fastest first
    rejected: list[Candidate]  # traced and too big
    untraced: int
    floor: Candidate | None  # set when nothing fits
    suggestions: list[str]
    untraceable: list[Candidate] = field(default_factory=list)  # the tracer could not follow these


#: Traces setups under a config, in the setups' order; each setup applies its own micro-batch size.
TraceFn = Callable[[list[Setup], BenchConfig], list[Prediction]]


def search(
    config: BenchConfig,
    budget: int,
    overheads: Overheads,
    trace: TraceFn,
    measured: dict[str, dict[str, Any]] | None = None,
    run_micro: int | None = None,
    wanted: int = 3,
    exclude: set[str] = frozenset(),
    parallel: int = 1,
    device_type: str = "meta",
) -> FitResult:
    """Trace candidates fastest-first until ``wanted`` fit; say what would fit when none does."""
    measured = measured or {}
    setups = candidates(config, exclude, device_type)
    if not setups:
        raise FitError("no strategy combination is left to try: drop some --exclude entries")
    times = {setup: expected_time(setup, config, measured, run_micro) for setup in setups}

    def judge(setup: Setup, prediction: Prediction) -> Candidate:
        total = overheads.device_total(prediction.device.total_bytes)
        return Candidate(setup, times[setup], prediction, total, total <= budget and not prediction.error)

    floor = floor_setup(setups)
    floor_candidate = judge(floor, trace([floor], config)[0])
    untraceable = [floor_candidate] if floor_candidate.prediction.error else []
    if not floor_candidate.fits and not untraceable:
        return FitResult(budget, [], [], len(setups) - 1, floor_candidate, _suggestions(floor, config, budget, overheads, trace))

    chosen: list[Candidate] = []
    rejected: list[Candidate] = []
    order = sorted(setups, key=lambda s: (times[s].seconds if times[s].seconds is not None else times[s].factor, s.label))
    traced = {floor}
    while order and len(chosen) < wanted:
        # As many traces at once as there are processes to run them.
        chunk, order = order[:parallel], order[parallel:]
        fresh = [setup for setup in chunk if setup != floor]
        predictions = dict(zip(fresh, trace(fresh, config))) if fresh else {}
        predictions[floor] = floor_candidate.prediction
        for setup in chunk:
            traced.add(setup)
            candidate = judge(setup, predictions[setup])
            if candidate.prediction.error:
                if candidate not in untraceable:
                    untraceable.append(candidate)
            elif not candidate.fits:
                rejected.append(candidate)
            elif len(chosen) < wanted:
                chosen.append(candidate)
    if not chosen and not rejected:
        raise FitError(f"no candidate could be traced ({untraceable[0].prediction.error}): fix that, or --exclude the strategy")
    if not chosen:
        smallest = min(rejected, key=lambda candidate: candidate.device_total)
        return FitResult(budget, [], rejected, len(setups) - len(traced), smallest, [], untraceable)
    return FitResult(budget, chosen, rejected, len(setups) - len(traced), None, [], untraceable)


def _suggestions(floor: Setup, config: BenchConfig, budget: int, overheads: Overheads, trace: TraceFn) -> list[str]:
    """Shorter sequences for the floor setup, halving until one fits (down to 16 tokens)."""
    length = config.data.max_length
    while length > 16:
        length //= 2
        shorter = dataclasses.replace(config, data=dataclasses.replace(config.data, max_length=length))
        prediction = trace([floor], shorter)[0]
        total = overheads.device_total(prediction.device.total_bytes)
        if total <= budget:
            return [f"--set data.max_length={length}: {floor.label} would need {total / GIB:.2f} GiB"]
    return [f"even data.max_length={length} does not fit: lower train.batch_size, or use a smaller model or a larger device"]
