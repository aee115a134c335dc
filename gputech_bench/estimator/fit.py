"""The fastest setup predicted to fit a memory budget.

Candidates are every strategy combination the registry allows, and for those with
accumulation every micro-batch size that keeps the effective batch (32 = 16x2, 8x4,
4x8, 2x16). A strategy the tracer cannot follow is a candidate when ``modelled.py`` has a
model for it (fsdp-offload, qlora): its figures are then labelled modelled.

Each trace takes seconds (a minute for an 8B model), so the search traces lazily, each
trace stopping as soon as the device passes the budget (what does not fit is known at its
first operator when its weights alone are too big):

1. the most frugal setup (the most strategies, the smallest micro-batch); if it does not
   fit, the most frugal setup of each *regime*, the strategies that decide where weights,
   gradients and optimizer state live (3, 4, lora, qlora, fsdp-offload...), with
   checkpointing and the smallest micro-batch added. If none of them fits, nothing does;
2. then candidates from the fastest down until enough of them fit;
3. and, when every fitting one trains only adapters (lora, qlora), on until the fastest
   setup that trains every weight is found too: for a model larger than the card that is
   host offload, the answer a full fine-tune needs.

Expected time comes from a measured run when one is given, or else from a cost model,
always labelled as such. The model's factors multiply, relative to the baseline's step:

* checkpointing (1): x 4/3, one more forward pass (a forward is about 1/3 of forward+backward);
* accumulation (2), k micro-batches: x (1 + 0.2 (k - 1)), smaller matmuls and more launches;
  0.2 reproduces the seed's measured 1.6x for 8x4 on an A30;
* 8-bit Adam (3): x 1.0, the optimizer step is small next to forward and backward;
* master copy on the host (4): x 3.8, the seed's measured ratio (host Adam and PCIe copies);
* fsdp-offload: x 3.8, assumed equal to strategy 4's: both move every weight and gradient
  over PCIe each step and step the optimizer on the CPU (not measured for fsdp-offload);
* LoRA: x 0.75, frozen weights need no weight gradients (backward of about one forward);
* qlora: x 1.0, LoRA's 0.75 times about 4/3 for dequantising every weight before each matmul
  (QLoRA's commonly reported slow-down against LoRA; an assumption, not a measurement);
* amp: x 0.6, half-precision matmuls on tensor cores. An assumption from commonly reported
  BERT-base speed-ups (1.5-2x), not a measurement of this project: a --from run replaces it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Collection

from ..config import BenchConfig
from ..errors import FitError, StrategyError
from ..results import CellResult
from ..strategies import Cell, combination_refusal, launch_refusal, parse_cell, registered
from ..units import format_size
from .modelled import can_model, modeller_for
from .overheads import Overheads
from .predict import Prediction, Setup

#: The effective batch is divided into this many micro-batches (16x2, 8x4, 4x8, 2x16 for 32).
ACCUMULATION_STEPS = (2, 4, 8, 16)
MODEL_FACTORS = {"1": 4 / 3, "3": 1.0, "4": 3.8, "fsdp-offload": 3.8, "lora": 0.75, "qlora": 1.0, "amp": 0.6,
                 "amp-fp16": 0.6}
ACCUMULATION_OVERHEAD = 0.2
#: Strategies that change only how much of the activations is live (checkpointing,
#: accumulation): a regime's most frugal setup adds them.
ACTIVATION_ONLY = ("1", "2")
#: Set in a prediction's facts when it was not traced because another setup with the same
#: weights (the same regime) showed them too big: the label of that setup.
SAME_WEIGHTS = "same_weights_as"
#: Strategies that train adapters instead of the model's own weights.
ADAPTERS = ("lora", "qlora")


def searchable(cls, device_type: str) -> bool:
    """Whether fit can weigh this strategy: traced on fake tensors, or modelled around a trace."""
    return not cls.trace_refusal(device_type) or can_model(cls.key)


def unsearchable(device_type: str) -> list[str]:
    """Strategies the estimate can neither trace nor model on ``device_type`` fake tensors, so fit leaves them out."""
    return [cls.key for cls in registered() if not searchable(cls, device_type)]


def modelled_strategies(device_type: str) -> list[str]:
    """Strategies fit weighs by a model around a trace (labelled as such), not by a trace alone."""
    return [cls.key for cls in registered() if cls.trace_refusal(device_type) and can_model(cls.key)]


def candidates(config: BenchConfig, exclude: Collection[str] = frozenset(), device_type: str = "meta") -> list[Setup]:
    """Every allowed, traceable (or modelled) combination, with each micro-batch size for those that accumulate."""
    strategies = [
        cls for cls in registered()
        if cls.key not in exclude and cls.name not in exclude and searchable(cls, device_type)
    ]
    batch = config.train.batch_size
    setups: list[Setup] = []
    for size in range(len(strategies) + 1):
        for combo in itertools.combinations(strategies, size):
            cell = Cell(tuple(combo))
            if combination_refusal(cell):
                continue
            if any(cls.trace_refusal(device_type) for cls in combo) and modeller_for(cell, device_type) is None:
                continue  # a model stands on a trace of the rest of the cell: one modelled strategy per cell
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


def _keys(setup: Setup) -> list[str]:
    return setup.cell.split("+") if setup.cell != "baseline" else []


def trains_every_weight(setup: Setup) -> bool:
    return not any(key in ADAPTERS for key in _keys(setup))


def modelled_factor(setup: Setup, config: BenchConfig) -> float:
    """Step time relative to the baseline's, from the cost model in this module's docstring."""
    factor = 1.0
    for key in _keys(setup):
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
    return max(setups, key=lambda s: (len(_keys(s)), -(s.micro_batch_size or 10**9)))


def regime(setup: Setup) -> str:
    """Where weights, gradients and optimizer state live: the cell without its activation-only strategies."""
    return "+".join(key for key in _keys(setup) if key not in ACTIVATION_ONLY) or "baseline"


def regime_floors(setups: list[Setup]) -> list[Setup]:
    """The most frugal setup of each regime (checkpointing, the smallest micro-batch), in first-seen order."""
    by_regime: dict[str, list[Setup]] = {}
    for setup in setups:
        by_regime.setdefault(regime(setup), []).append(setup)
    return [floor_setup(group) for group in by_regime.values()]


def tensor_limit(budget: int, overheads: Overheads) -> int:
    """The largest tensor peak whose device total (with reserve and context) stays within ``budget``."""
    bound = max(0, int((budget - overheads.context_bytes) / (1 + overheads.reserve_fraction)))
    while bound > 0 and overheads.device_total(bound) > budget:
        bound -= 1
    while overheads.device_total(bound + 1) <= budget:
        bound += 1
    return bound


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    time: ExpectedTime
    prediction: Prediction
    device_total: int
    fits: bool

    @property
    def at_least(self) -> bool:
        """The trace stopped once past the budget: ``device_total`` is a lower bound."""
        return self.prediction.stopped


@dataclass(frozen=True)
class FitResult:
    budget: int
    chosen: list[Candidate]  # fitting, fastest first
    rejected: list[Candidate]  # traced and too big
    untraced: int
    floor: Candidate | None  # set when nothing fits
    suggestions: list[str]
    untraceable: list[Candidate] = field(default_factory=list)  # the tracer could not follow these
    #: The fastest fitting setup that trains every weight, when none of ``chosen`` does
    #: (they all train adapters); None when one of them does, or when none fits.
    full_training: Candidate | None = None
    #: Every setup that trains every weight was weighed, and none fits.
    no_full_training_fits: bool = False


#: Traces setups under a config, in the setups' order; each setup applies its own micro-batch
#: size; ``limit`` (tensor bytes) lets a trace stop once past it.
TraceFn = Callable[..., list[Prediction]]


def search(
    config: BenchConfig,
    budget: int,
    overheads: Overheads,
    trace: TraceFn,
    measured: dict[str, CellResult] | None = None,
    run_micro: int | None = None,
    wanted: int = 3,
    exclude: Collection[str] = frozenset(),
    parallel: int = 1,
    device_type: str = "meta",
) -> FitResult:
    """Trace candidates fastest-first until ``wanted`` fit; say what would fit when none does."""
    measured = measured or {}
    setups = candidates(config, exclude, device_type)
    if not setups:
        raise FitError("no strategy combination is left to try: drop some --exclude entries")
    times = {setup: expected_time(setup, config, measured, run_micro) for setup in setups}
    limit = tensor_limit(budget, overheads)
    judged: dict[Setup, Candidate] = {}

    def judge(setup: Setup, prediction: Prediction) -> Candidate:
        total = overheads.device_total(prediction.device.total_bytes)
        fits = total <= budget and not prediction.error and not prediction.stopped
        return Candidate(setup, times[setup], prediction, total, fits)

    #: Regimes whose weights alone pass the limit, and the setup whose trace showed it.
    too_heavy: dict[str, Candidate] = {}

    def run(batch: list[Setup]) -> None:
        fresh = [setup for setup in batch if setup not in judged]
        for setup in [setup for setup in fresh if regime(setup) in too_heavy]:
            # Checkpointing and accumulation leave the weights as they are: a setup of a regime
            # whose weights alone are too big is too big, without a trace of its own.
            shown = too_heavy[regime(setup)]
            prediction = Prediction(setup, shown.prediction.device, None, 0.0, {SAME_WEIGHTS: shown.setup.label},
                                    stopped=True)
            judged[setup] = judge(setup, prediction)
            fresh.remove(setup)
        for setup, prediction in zip(fresh, trace(fresh, config, limit=limit) if fresh else []):
            judged[setup] = judge(setup, prediction)
            weights = sum(prediction.device.by_category.get(category, 0) for category in ("parameters", "buffers"))
            if prediction.stopped and weights > limit and not prediction.modelled:
                too_heavy.setdefault(regime(setup), judged[setup])

    # 1. The most frugal setup of all; when it does not fit, each regime's most frugal one
    #    (an LLM's answer may be a regime with fewer strategies, such as qlora): if none
    #    of them fits, nothing does.
    first = floor_setup(setups)
    run([first])
    floors = [first]
    if not judged[first].fits:
        floors += [floor for floor in regime_floors(setups) if floor != first]
        for start in range(1, len(floors), max(parallel, 1)):
            run(floors[start:start + max(parallel, 1)])
    untraceable = [judged[s] for s in floors if judged[s].prediction.error]
    if not any(judged[s].fits for s in floors):
        known = [judged[s] for s in floors if not judged[s].prediction.error]
        if not known:
            raise FitError(f"no candidate could be traced ({untraceable[0].prediction.error}): "
                           "fix that, or --exclude the strategy")
        # The smallest figure a finished trace gave, else the smallest lower bound.
        smallest = min(known, key=lambda c: (c.at_least, c.device_total, c.setup.label))
        return FitResult(budget, [], [], len(setups) - len(judged), smallest,
                         _suggestions(smallest.setup, config, budget, overheads, trace, limit), untraceable)

    # 2. Fastest first until enough fit; 3. then on for the fastest that trains every weight.
    chosen: list[Candidate] = []
    rejected: list[Candidate] = []
    full_training: Candidate | None = None
    order = sorted(setups, key=lambda s: (times[s].seconds if times[s].seconds is not None else times[s].factor, s.label))

    def needs_full_training() -> bool:
        return full_training is None and not any(trains_every_weight(c.setup) for c in chosen)

    def wants(setup: Setup) -> bool:
        return len(chosen) < wanted or (needs_full_training() and trains_every_weight(setup))

    while order := [setup for setup in order if wants(setup)]:
        # As many traces at once as there are processes to run them.
        chunk, order = order[:parallel], order[parallel:]
        run(chunk)
        for setup in chunk:
            candidate = judged[setup]
            if candidate.prediction.error:
                if candidate not in untraceable:
                    untraceable.append(candidate)
            elif not candidate.fits:
                rejected.append(candidate)
            elif len(chosen) < wanted:
                chosen.append(candidate)
            elif needs_full_training() and trains_every_weight(setup):
                full_training = candidate
    # Every setup that trains every weight was weighed when one was still wanted at the end.
    none_full = chosen != [] and needs_full_training() and any(trains_every_weight(s) for s in setups)
    return FitResult(budget, chosen, rejected, len(setups) - len(judged), None, [], untraceable, full_training, none_full)


def _suggestions(floor: Setup, config: BenchConfig, budget: int, overheads: Overheads, trace: TraceFn,
                 limit: int | None = None) -> list[str]:
    """Shorter sequences for the floor setup, halving until one fits (down to 16 tokens)."""
    length = config.data.max_length
    while length > 16:
        length //= 2
        shorter = dataclasses.replace(config, data=dataclasses.replace(config.data, max_length=length))
        prediction = trace([floor], shorter, limit=limit)[0]
        total = overheads.device_total(prediction.device.total_bytes)
        if total <= budget and not prediction.stopped and not prediction.error:
            return [f"--set data.max_length={length}: {floor.label} would need {format_size(total)}"]
    return [f"even data.max_length={length} does not fit: lower train.batch_size, or use a smaller model or a larger device"]
