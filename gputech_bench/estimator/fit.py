"""The fastest setup predicted to fit a memory budget.

Candidates are every strategy combination the registry allows, and for those with
accumulation every micro-batch size that keeps the effective batch (32 = 16x2, 8x4,
4x8, 2x16). A strategy the tracer cannot follow is a candidate when ``modelled.py`` has a
model for it (fsdp-offload, qlora, paged-adam8bit): its figures are then labelled modelled.
On a torch without CUDA, amp is traced on the stand-in under CUDA autocast's op lists, its
figures labelled stand-in. What fit leaves out, and why, ``not_searched`` says.

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
always labelled as such. The model's factors multiply, relative to the baseline's step; each
strategy declares its own (``time_factor``, with where the figure comes from), and
``gputech-bench strategies`` lists them: checkpointing x 4/3 (one more forward pass),
accumulation x (1 + 0.2 (k - 1)) for k micro-batches (the seed's measured 1.6x for 8x4),
strategy 4 x 3.8 (the seed's measured ratio), LoRA x 0.75, amp x 0.6 (an assumption), ...
Which strategies only change activations (a regime's floor adds them), which train
adapters, and how many micro-batches accumulation tries are the strategies' facts too.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Collection

from ..config import BenchConfig
from ..errors import FitError, StrategyError, first_line
from ..metrics import BUFFERS, OPTIMIZER_STATE, PARAMETERS, QUANTIZED_WEIGHTS
from ..results import CellResult
from ..strategies import BASELINE, Cell, Strategy, combination_refusal, launch_refusal, parse_cell, registered
from ..strategies.facts import StateLocation
from ..units import format_size
from .modelled import can_model, modeller_for
from .overheads import Overheads
from .predict import Prediction, Setup

#: Set in a prediction's facts when it was not traced because another setup with the same
#: weights (the same regime) showed them too big: the label of that setup.
SAME_WEIGHTS = "same_weights_as"
#: The bytes every setup of a regime holds alike (``FitSearch.weigh``).
REGIME_STATE = tuple(category.name for category in (PARAMETERS, BUFFERS, OPTIMIZER_STATE, QUANTIZED_WEIGHTS))


def searchable(cls: type[Strategy], device_type: str) -> bool:
    """Whether fit can weigh this strategy: traced on fake tensors, or modelled around a trace."""
    return not cls.trace_refusal(device_type) or can_model(cls)


def unsearchable(device_type: str) -> list[str]:
    """Strategies the estimate can neither trace nor model on ``device_type`` fake tensors, so fit leaves them out."""
    return [cls.key for cls in registered() if not searchable(cls, device_type)]


def not_searched(config: BenchConfig, device_type: str, exclude: Collection[str] = frozenset(),
                 world_size: int = 1) -> dict[str, str]:
    """Each strategy fit leaves out, and why: the estimate can neither trace nor model it on
    ``device_type`` (its own reason), it runs on one rank only and fit weighs ``world_size``,
    or this config refuses it on its own (sparse-head under an objective that labels every
    position). Excluded strategies are not listed."""
    reasons: dict[str, str] = {}
    for cls in registered():
        if cls.key in exclude or cls.name in exclude:
            continue
        if not searchable(cls, device_type):
            reasons[cls.key] = f"the estimate cannot weigh it: {cls.trace_refusal(device_type)}"
            continue
        if world_size > 1 and cls.one_rank_only:
            reasons[cls.key] = f"one rank only: {cls.one_rank_only}"
            continue
        refusal = _config_refusal(Cell((cls,)), config)
        if refusal:
            reasons[cls.key] = f"refused by this config: {refusal}"
    return reasons


def _config_refusal(cell: Cell, config: BenchConfig) -> str | None:
    """Why the config refuses ``cell`` at every micro-batch size fit tries for it (accumulation
    is tried at its own sizes, not the config's), or None when one of them is accepted."""
    reason = None
    for micro in micro_batch_sizes(cell, config.train.batch_size):
        try:
            launch_refusal(cell, Setup(cell.name, micro).config_for(config))
            return None
        except StrategyError as refusal:
            reason = first_line(refusal)
    return reason or f"no micro-batch size divides train.batch_size={config.train.batch_size} into 2 or more"


def modelled_strategies(device_type: str) -> list[str]:
    """Strategies fit weighs by a model around a trace (labelled as such), not by a trace alone."""
    return [cls.key for cls in registered() if cls.trace_refusal(device_type) and can_model(cls)]


def micro_batch_sizes(cell: Cell, batch: int, world_size: int = 1) -> list[int | None]:
    """The micro-batch sizes fit tries for ``cell``: each rank's share of the batch split into
    each count its strategy declares (16x2, 8x4, 4x8, 2x16 for 32 on one rank), or [None]
    when none splits the batch."""
    counts = next((cls.micro_batch_counts for cls in cell.strategies if cls.micro_batch_counts), ())
    if not counts:
        return [None]
    rows = batch // world_size
    return [rows // steps for steps in counts if rows >= steps and rows % steps == 0]


def saves_nothing_alone(cell: Cell, world_size: int) -> bool:
    """A cell that shards its state over the ranks on the device (fsdp) saves nothing on one
    rank, where it only adds its collectives: fit leaves it out there."""
    return world_size == 1 and any(cls.shards and cls.state_location is StateLocation.DEVICE for cls in cell.strategies)


def candidates(config: BenchConfig, exclude: Collection[str] = frozenset(), device_type: str = "meta",
               world_size: int = 1) -> list[Setup]:
    """Every allowed, traceable (or modelled) combination, with each micro-batch size for those
    that accumulate, on ``world_size`` ranks: a cell that shards is sharded over them (fsdp,
    fsdp-offload), any other is replicated (DDP)."""
    strategies = [
        cls for cls in registered()
        if cls.key not in exclude and cls.name not in exclude and searchable(cls, device_type)
        and not (world_size > 1 and cls.one_rank_only)
    ]
    setups: list[Setup] = []
    for size in range(len(strategies) + 1):
        for combo in itertools.combinations(strategies, size):
            cell = Cell(tuple(combo))
            if combination_refusal(cell) or saves_nothing_alone(cell, world_size):
                continue
            if any(cls.trace_refusal(device_type) for cls in combo) and modeller_for(cell, device_type) is None:
                continue  # a model stands on a trace of the rest of the cell: one modelled strategy per cell
            for micro in micro_batch_sizes(cell, config.train.batch_size, world_size):
                setup = Setup(cell.name, micro, world_size)
                try:
                    launch_refusal(cell, setup.config_for(config))
                except StrategyError:
                    continue
                setups.append(setup)
    return setups


def _strategies(setup: Setup) -> tuple[type[Strategy], ...]:
    return parse_cell(setup.cell).strategies


def trains_every_weight(setup: Setup) -> bool:
    return not any(cls.trains_adapters for cls in _strategies(setup))


def modelled_factor(setup: Setup, config: BenchConfig) -> float:
    """Step time relative to the baseline's: the product of the cell's declared time factors."""
    rows = config.train.batch_size // setup.world_size
    micro_batches = rows // setup.micro_batch_size if setup.micro_batch_size else None
    factor = 1.0
    for cls in _strategies(setup):
        factor *= cls.time_factor.for_micro_batches(micro_batches)
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
    return max(setups, key=lambda s: (len(_strategies(s)), -(s.micro_batch_size or 10**9)))


def regime(setup: Setup) -> str:
    """Where weights, gradients and optimizer state live: the cell without its activation-only strategies."""
    return "+".join(cls.key for cls in _strategies(setup) if not cls.changes_activations_only) or BASELINE


def regime_floors(setups: list[Setup]) -> list[Setup]:
    """The most frugal setup of each regime (checkpointing, the smallest micro-batch), in first-seen order."""
    by_regime: dict[str, list[Setup]] = {}
    for setup in setups:
        by_regime.setdefault(regime(setup), []).append(setup)
    return [floor_setup(group) for group in by_regime.values()]


def tensor_limit(budget: int, overheads: Overheads) -> int:
    """The largest tensor peak that could still fit ``budget``: the allocator holds at least
    what the tensors need, and the context comes on top. A trace stops past it; one that
    stays under it is judged by its replayed reserve (``device_total``)."""
    return max(0, budget - overheads.context_bytes)


def device_range(overheads: Overheads, prediction: Prediction) -> tuple[int, int]:
    """(low, high) of what nvidia-smi will show; a setup is judged by the upper end. A
    stopped trace gives a lower bound: its live tensors and the context."""
    if prediction.stopped:
        bound = prediction.device.total_bytes + overheads.context_bytes
        return bound, bound
    return overheads.device_range(prediction.device.total_bytes, prediction.reserved)


def device_total(overheads: Overheads, prediction: Prediction) -> int:
    return device_range(overheads, prediction)[1]


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    time: ExpectedTime
    prediction: Prediction
    device_total: int  # the upper end of what nvidia-smi will show: what the budget is judged against
    fits: bool
    #: The lower end, where one allocator segment may or may not be needed (else device_total).
    device_total_low: int | None = None

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


class FitSearch:
    """One search for the fastest setups that fit a budget, one method per phase.

    ``run()`` goes through them: the candidates and their expected times (``__init__``);
    the most frugal setups, which decide whether anything fits (``weigh_floors``); when
    nothing does, the smallest figure and a shorter sequence that would fit
    (``nothing_fits``); else candidates fastest first until ``wanted`` fit, and on for the
    fastest that trains every weight when they all train adapters (``rank``).
    """

    def __init__(
        self,
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
        world_size: int = 1,
    ) -> None:
        self.config, self.budget, self.overheads, self.trace = config, budget, overheads, trace
        self.wanted, self.parallel = wanted, parallel
        self.world_size = world_size
        self.setups = candidates(config, exclude, device_type, world_size)
        if not self.setups:
            raise FitError("no strategy combination is left to try: drop some --exclude entries")
        self.times = {setup: expected_time(setup, config, measured or {}, run_micro) for setup in self.setups}
        self.limit = tensor_limit(budget, overheads)
        self.judged: dict[Setup, Candidate] = {}
        #: Regimes whose weights and optimizer state alone pass the limit, and the setup whose trace showed it.
        self.too_heavy: dict[str, Candidate] = {}
        self.untraceable: list[Candidate] = []

    def run(self) -> FitResult:
        """Trace candidates fastest-first until ``wanted`` fit; say what would fit when none does."""
        floors = self.weigh_floors()
        if not any(self.judged[s].fits for s in floors):
            return self.nothing_fits(floors)
        return self.rank()

    def judge(self, setup: Setup, prediction: Prediction) -> Candidate:
        low, total = device_range(self.overheads, prediction)
        fits = total <= self.budget and not prediction.error and not prediction.stopped
        return Candidate(setup, self.times[setup], prediction, total, fits, low)

    def weigh(self, batch: list[Setup]) -> None:
        """Judge the setups not judged yet: by a trace, or by their regime's weights and optimizer state alone."""
        fresh = [setup for setup in batch if setup not in self.judged]
        for setup in [setup for setup in fresh if regime(setup) in self.too_heavy]:
            # Checkpointing, accumulation, a chunked loss and activation offload leave the weights and
            # the optimizer state as they are: a setup of a regime whose weights and optimizer state
            # alone are too big is too big, without a trace of its own. (Not the gradients:
            # accumulation can hold them unsharded, so one setup's are no floor for the others'.)
            shown = self.too_heavy[regime(setup)]
            prediction = Prediction(setup, shown.prediction.device, None, 0.0, {SAME_WEIGHTS: shown.setup.label},
                                    stopped=True)
            self.judged[setup] = self.judge(setup, prediction)
            fresh.remove(setup)
        for setup, prediction in zip(fresh, self.trace(fresh, self.config, limit=self.limit) if fresh else []):
            self.judged[setup] = self.judge(setup, prediction)
            weights = sum(prediction.device.by_category.get(category, 0) for category in REGIME_STATE)
            # Weights and optimizer state alone past the limit show the whole regime too heavy: a stopped trace's
            # (unless its figure is modelled around a proxy, whose weights it counted), or a
            # finished figure's, such as one extrapolated to the model's depth (never stopped).
            traced = prediction.source in ("traced", "stand-in")
            if weights > self.limit and not prediction.error and (traced or not prediction.stopped):
                self.too_heavy.setdefault(regime(setup), self.judged[setup])

    def weigh_floors(self) -> list[Setup]:
        """1. The most frugal setup of all; when it does not fit, each regime's most frugal one
        (an LLM's answer may be a regime with fewer strategies, such as qlora): if none of
        them fits, nothing does. Returns the floors weighed."""
        first = floor_setup(self.setups)
        self.weigh([first])
        floors = [first]
        if not self.judged[first].fits:
            floors += [floor for floor in regime_floors(self.setups) if floor != first]
            step = max(self.parallel, 1)
            for start in range(1, len(floors), step):
                self.weigh(floors[start:start + step])
        self.untraceable = [self.judged[s] for s in floors if self.judged[s].prediction.error]
        return floors

    def nothing_fits(self, floors: list[Setup]) -> FitResult:
        """No floor fits: the smallest figure a finished trace gave (else the smallest lower
        bound), and the sequence length at which it would fit."""
        known = [self.judged[s] for s in floors if not self.judged[s].prediction.error]
        if not known:
            raise FitError(f"no candidate could be traced ({self.untraceable[0].prediction.error}): "
                           "fix that, or --exclude the strategy")
        smallest = min(known, key=lambda c: (c.at_least, c.device_total, c.setup.label))
        suggestions = _suggestions(smallest.setup, self.config, self.budget, self.overheads, self.trace, self.limit)
        return FitResult(self.budget, [], [], len(self.setups) - len(self.judged), smallest, suggestions,
                         self.untraceable)

    def rank(self) -> FitResult:
        """2. Fastest first until enough fit; 3. then on for the fastest that trains every weight."""
        chosen: list[Candidate] = []
        rejected: list[Candidate] = []
        full_training: Candidate | None = None
        times = self.times
        order = sorted(self.setups,
                       key=lambda s: (times[s].seconds if times[s].seconds is not None else times[s].factor, s.label))

        def needs_full_training() -> bool:
            return full_training is None and not any(trains_every_weight(c.setup) for c in chosen)

        def wants(setup: Setup) -> bool:
            return len(chosen) < self.wanted or (needs_full_training() and trains_every_weight(setup))

        while order := [setup for setup in order if wants(setup)]:
            # As many traces at once as there are processes to run them.
            chunk, order = order[:self.parallel], order[self.parallel:]
            self.weigh(chunk)
            for setup in chunk:
                candidate = self.judged[setup]
                if candidate.prediction.error:
                    if candidate not in self.untraceable:
                        self.untraceable.append(candidate)
                elif not candidate.fits:
                    rejected.append(candidate)
                elif len(chosen) < self.wanted:
                    chosen.append(candidate)
                elif needs_full_training() and trains_every_weight(setup):
                    full_training = candidate
        # Every setup that trains every weight was weighed when one was still wanted at the end.
        none_full = chosen != [] and needs_full_training() and any(trains_every_weight(s) for s in self.setups)
        return FitResult(self.budget, chosen, rejected, len(self.setups) - len(self.judged), None, [],
                         self.untraceable, full_training, none_full)


def _suggestions(floor: Setup, config: BenchConfig, budget: int, overheads: Overheads, trace: TraceFn,
                 limit: int | None = None) -> list[str]:
    """Shorter sequences for the floor setup, halving until one fits (down to 16 tokens)."""
    length = config.data.max_length
    while length > 16:
        length //= 2
        shorter = dataclasses.replace(config, data=dataclasses.replace(config.data, max_length=length))
        prediction = trace([floor], shorter, limit=limit)[0]
        total = device_total(overheads, prediction)
        if total <= budget and not prediction.stopped and not prediction.error:
            return [f"--set data.max_length={length}: {floor.label} would need {format_size(total)}"]
    return [f"even data.max_length={length} does not fit: lower train.batch_size, or use a smaller model or a larger device"]
