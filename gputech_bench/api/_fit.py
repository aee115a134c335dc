"""``fit``: the fastest setup predicted to fit a memory budget, and (``verify=True``) that
setup run as a real cell beside its prediction.

Kept apart from _estimate.py, which _run.py imports for the estimate after a run: a fit's
verification runs a cell through _run.py, so the two stay one-way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from rich.markup import escape

from ..config import BenchConfig, model_overrides
from ..errors import ConfigError
from ..estimator.measured import error_percent, measured_peak
from ..estimator.overheads import DEFAULTS, calibrate
from ..metrics import EPOCH_SECONDS, NVML_PROCESS_PEAK
from ..results import CellResult, RunFolder
from ..run.launch import Launch
from ..run.request import CellPlacement, RunRequest, Schedule
from ..units import GIB, MIB, format_gib, parse_size
from ._display import text_html
from ._estimate import PathLike, _jobs, _run_config, _run_path, allocator_conf, run_world_size, world_size_of
from ._output import Output, output_or_default
from ._progress import trace_progress
from ._run import execute
from ._setup import Overrides, Selection

#: The version of ``Fit.to_json``'s layout.
FIT_SCHEMA = "gputech-bench/fit/1"

if TYPE_CHECKING:
    import pandas as pd

    from ..estimator.fit import Candidate, FitResult
    from ..estimator.measured import Measured
    from ..estimator.overheads import Overheads
    from ..estimator.predict import TracePool, Setup
    from ._run import Run


# --------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class Verification:
    """The best setup run as a real cell (``fit(verify=True)``), beside its prediction."""

    setup: "Setup"
    run: "Run"
    result: CellResult
    #: The traced tensor peak, and the same plus the allocator reserve and CUDA context.
    predicted_bytes: int
    predicted_total_bytes: int
    measured: "Measured"
    #: Predicted against measured tensor peak, in %; None when nothing was measured.
    error_percent: Optional[float]
    #: NVML's peak for the cell's process (CUDA only), and whether it stayed within the budget.
    nvml_process_mib: Optional[float]
    fits_budget: Optional[bool]


class Fit:
    """The fastest setups predicted to fit a memory budget: what ``fit()`` returns.

    ``best`` is the chosen setup (a cell and, with accumulation, a micro-batch size), or None
    when nothing fits; ``full_training`` is the fastest fitting setup that trains every weight
    when the best ones train adapters only; ``frame`` has a row per traced candidate with
    ``verdict`` ``best``, ``fits``, ``full``, ``too big`` or ``not traced`` and ``figure``
    ``traced`` or ``modelled`` (the ``modelled`` column says how); ``suggestions`` say what
    would fit when nothing does. ``to_json()`` has every candidate weighed.

    Example::

        >>> from gputech_bench import fit
        >>> found = fit("8GiB", preset="seed")
        >>> found.best.cell, found.best.micro_batch_size
        >>> found.frame
    """

    def __init__(self, result: "FitResult", config: BenchConfig, not_searched: list[str],
                 verification: Optional[Verification] = None, modelled: Optional[list[str]] = None,
                 overheads: "Overheads | None" = None, not_searched_reasons: Optional[dict[str, str]] = None,
                 world_size: int = 1) -> None:
        self.result = result
        #: The ranks each setup runs on: above 1 every figure is one rank's.
        self.world_size = world_size
        self.config = config
        #: Strategies left out: the tracer can neither follow nor model them on this machine, or
        #: the config refuses them (sparse-head where every position carries a label).
        self.not_searched = not_searched
        #: Why each of ``not_searched`` was left out, in one line.
        self.not_searched_reasons = dict(not_searched_reasons or {})
        #: Strategies weighed by a model around a trace (fsdp-offload, qlora), labelled so.
        self.modelled = list(modelled or [])
        #: The CUDA context and allocator reserve added to each traced peak.
        self.overheads = overheads
        self.verification = verification

    @property
    def budget_bytes(self) -> int:
        return self.result.budget

    @property
    def fits(self) -> bool:
        """Whether any setup is predicted to fit."""
        return self.result.floor is None and bool(self.result.chosen)

    @property
    def best(self) -> "Setup | None":
        """The fastest setup that fits (``.cell``, ``.micro_batch_size``, ``.label``), or None."""
        return self.result.chosen[0].setup if self.fits else None

    @property
    def full_training(self) -> "Setup | None":
        """The fastest fitting setup that trains every weight, when the best ones train adapters only."""
        found = self.result.full_training
        return found.setup if found is not None else None

    @property
    def suggestions(self) -> list[str]:
        return list(self.result.suggestions)

    def _row(self, candidate: "Candidate", verdict: str) -> dict[str, Any]:
        from ..estimator.fit import gives_up

        host = candidate.prediction.host
        time = candidate.time
        return {
            "verdict": verdict, "setup": candidate.setup.label, "cell": candidate.setup.cell,
            "micro_batch_size": candidate.setup.micro_batch_size,
            "device_gib": None if candidate.prediction.error else candidate.device_total / GIB,
            # The lower end where one allocator segment may or may not be needed; device_gib is judged.
            "device_low_gib": None if candidate.prediction.error or candidate.device_total_low is None
            else candidate.device_total_low / GIB,
            # The trace stopped once past the budget: device_gib is what was live then, a lower bound.
            "device_is_lower_bound": candidate.at_least,
            "host_gib": None if host is None or candidate.prediction.error else host.total_bytes / GIB,
            "figure": candidate.prediction.source, "modelled": candidate.prediction.modelled,
            EPOCH_SECONDS.name: time.seconds, "time_x_baseline": time.factor, "time_from": time.source,
            "gives_up": gives_up(candidate.setup), "error": candidate.prediction.error,
        }

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per traced candidate: the fitting ones fastest first, then those too big, then
        those the tracer could not follow (and, when nothing fits, the most frugal setup)."""
        import pandas as pd

        result = self.result
        rows = [self._row(candidate, "best" if rank == 0 else "fits") for rank, candidate in enumerate(result.chosen)]
        if result.full_training is not None:
            rows.append(self._row(result.full_training, "full"))
        rows += [self._row(candidate, "too big") for candidate in result.rejected]
        if result.floor is not None and result.floor not in result.rejected:
            rows.append(self._row(result.floor, "too big"))
        rows += [self._row(candidate, "not traced") for candidate in result.untraceable]
        columns = ["verdict", "setup", "cell", "micro_batch_size", "device_gib", "device_low_gib", "device_is_lower_bound",
                   "host_gib",
                   "figure", "modelled", EPOCH_SECONDS.name, "time_x_baseline", "time_from", "gives_up", "error"]
        return pd.DataFrame(rows, columns=columns)

    def to_dict(self) -> dict[str, Any]:
        """The search's result: every candidate weighed, each figure with how it came about."""
        from ..estimator.fit import gives_up, trains_every_weight

        result, config, overheads = self.result, self.config, self.overheads

        def candidate(c: "Candidate") -> dict[str, Any]:
            return {
                "setup": c.setup.label,
                "cell": c.setup.cell,
                "micro_batch_size": c.setup.micro_batch_size,
                "fits": c.fits,
                "device_total_bytes": c.device_total,
                "device_total_low_bytes": c.device_total_low,
                "device_total_is_lower_bound": c.at_least,
                "trains_every_weight": trains_every_weight(c.setup),
                "time_factor": c.time.factor,
                "time_seconds_per_epoch": c.time.seconds,
                "time_from": c.time.source,
                "gives_up": gives_up(c.setup),
                "prediction": c.prediction.to_dict(),
            }

        return {
            "schema": FIT_SCHEMA,
            "budget_bytes": result.budget,
            "world_size": self.world_size,
            "model": config.model.pretrained or "(model.* fields)",
            "model_overrides": list(model_overrides(config.model)),
            "batch_size": config.train.batch_size,
            "max_length": config.data.max_length,
            "objective": config.data.objective,
            "attention": config.model.attention,
            "overheads": None if overheads is None else {
                "cuda_context_bytes": overheads.context_bytes, "cuda_context_source": overheads.context_source,
                "allocator_reserve_fraction": overheads.reserve_fraction,
                "allocator_reserve_source": overheads.reserve_source,
            },
            "not_searched": self.not_searched,
            "not_searched_reasons": self.not_searched_reasons,
            "modelled_strategies": self.modelled,
            "chosen": [candidate(c) for c in result.chosen],
            "full_training": None if result.full_training is None else candidate(result.full_training),
            "no_full_training_fits": result.no_full_training_fits,
            "rejected": [candidate(c) for c in result.rejected],
            "untraceable": [candidate(c) for c in result.untraceable],
            "floor": None if result.floor is None else candidate(result.floor),
            "suggestions": result.suggestions,
            "untraced": result.untraced,
        }

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def __str__(self) -> str:
        # Plain text: the setups as a table, then what would fit (the terminal's rich table is
        # the command line's: cli/estimate.py).
        result = self.result
        per_rank = f" per rank of {self.world_size}" if self.world_size > 1 else ""
        head = (f"setups that fit {format_gib(result.budget)}{per_rank}, fastest first" if self.fits
                else f"nothing fits {format_gib(result.budget)}{per_rank}")
        lines = [head, self.frame.to_string(index=False)]
        lines += [f"  would fit: {line}" for line in result.suggestions]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return text_html(str(self))

    def __repr__(self) -> str:
        return f"<Fit {format_gib(self.result.budget)}: best {self.best.label if self.best else None}>"


def fit(
    budget: str,
    *,
    preset: Optional[str] = None,
    overrides: Overrides = None,
    model: Optional[str] = None,
    from_run: "PathLike | Run | None" = None,
    exclude: Iterable[str] = (),
    top: int = 3,
    verify: bool = False,
    results: PathLike = "results",
    jobs: int = 0,
    progress: bool = True,
    output: Output | None = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
) -> Fit:
    """Find the fastest setup predicted to fit a memory budget, as ``gputech-bench fit`` does.

    Tries every strategy combination the registry allows, and micro-batch sizes 16x2, 8x4,
    4x8 and 2x16 for accumulation. ``budget`` reads ``"24GiB"`` (2^30) or ``"24GB"`` (10^9).
    ``from_run`` (a run folder or :class:`Run`) supplies measured times, overheads and its
    config; without it, times come from a labelled cost model. ``exclude`` leaves strategies
    out (``["lora"]``); ``top`` is how many fitting setups to list; ``verify=True`` runs the
    best one as a real cell into ``results`` and puts its measurement beside the prediction
    (``Fit.verification``).

    Nothing fitting is an answer, not an error: ``Fit.best`` is None and ``Fit.suggestions``
    says what would fit. Bad input raises :class:`UserError` (one line).

    Example::

        >>> from gputech_bench import fit
        >>> found = fit("8GiB", preset="seed", exclude=["lora"])
        >>> found.best          # Setup(cell='1+2+3', micro_batch_size=8), say
        >>> found.frame         # every traced candidate, fastest first
    """
    from ..estimator.depth import depth_to_extrapolate
    from ..estimator.fit import FitSearch, modelled_strategies, not_searched
    from ..estimator.predict import TracePool
    from ..estimator.trace import trace_target
    from ..modeling import model_depth
    from ..strategies.registry import lookup

    output = output_or_default(output)
    world_size = world_size_of(nproc_per_node, nnodes)
    if verify and world_size > 1:
        raise ConfigError("--verify runs the best setup in one process: drop it, and check a per-rank figure with "
                          "'run --nproc-per-node N' and 'estimate --compare RUN_DIR'")
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude)
    if top < 1:
        raise ConfigError(f"--top {top}: list at least 1 setup")
    measured: dict[str, Any] = {}
    run_results = None
    budget_bytes = parse_size(budget)
    for name in exclude:
        lookup(name)
    if from_run is not None:
        if preset or overrides or model:
            raise ConfigError("--from uses the run's own config: drop --preset, --set and --model")
        config, run_results = _run_config(_run_path(from_run))
        measured = {result.cell: result for result in run_results}
        if world_size == 1:
            world_size = run_world_size(run_results)
    else:
        config = Selection(None, False, preset, overrides, model, None, None, "auto").config(output)
    overheads = calibrate(run_results) if run_results else DEFAULTS
    workers = _jobs(jobs)
    excluded = {name.strip().lower() for name in exclude}
    device_type = trace_target().device.type
    reasons = not_searched(config, device_type, excluded, world_size)
    left_out = list(reasons)
    if left_out:
        listed = "; ".join(f"{key} ({reason})" for key, reason in reasons.items())
        output.say(f"[dim]not searched (measure them with 'run'): {escape(listed)}[/]")
    if world_size == 1:
        output.say("[dim]on one rank: fsdp is left out (it shards over ranks and saves nothing on one; "
                   "pass --nproc-per-node)[/]")
    else:
        output.say(f"[dim]per rank of {world_size}: fsdp cells sharded (traced in a fake process group), "
                   "the others replicated (DDP, with their gradient buckets), fsdp-offload modelled[/]")
        depth = depth_to_extrapolate(model_depth(config.model))
        if depth is not None:
            output.say(f"[dim]each setup {escape(depth.describe())}; 'estimate' traces any of them whole[/]")
    modelled = [key for key in modelled_strategies(device_type) if key not in excluded]
    if modelled:
        output.say(f"[dim]modelled around a trace, not traced (their figures say so): {', '.join(modelled)}[/]")
    # One pool for the whole search: fit traces a few setups at a time, and a fresh pool each
    # time would import torch and transformers and read the tokenised data again.
    with TracePool(workers, allocator_conf=allocator_conf(run_results)) as pool:
        result = FitSearch(
            config, budget_bytes, overheads, _tracer(pool, output if progress else None),
            measured, config.strategy.micro_batch_size, top, excluded, parallel=workers, device_type=device_type,
            world_size=world_size,
        ).run()
    found = Fit(result, config, left_out, modelled=modelled, overheads=overheads, not_searched_reasons=reasons,
                world_size=world_size)
    if verify and found.fits:
        found.verification = _verify(result.chosen[0], config, Path(results), budget_bytes, output, progress)
    return found


def _tracer(pool: "TracePool", output: Output | None):
    """``FitSearch``'s trace function: the trace pool, with a progress bar per batch of setups."""

    def trace(setups, config: BenchConfig, limit: Optional[int] = None):
        if output is None:
            return pool.predict(setups, config, limit=limit, extrapolate=True)
        with trace_progress(output.console) as progress:
            task = progress.add_task(f"tracing {', '.join(setup.label for setup in setups)}", total=len(setups))
            return pool.predict(setups, config, on_done=lambda prediction: progress.advance(task), limit=limit,
                                extrapolate=True)

    return trace


def _verify(candidate: "Candidate", config: BenchConfig, results_dir: Path, budget: int, output: Output,
            progress: bool) -> Verification:
    """Run the chosen setup as a real cell and put its measurement next to the prediction."""

    setup = candidate.setup
    name = f"fit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    output.say(f"verifying {setup.label} as a real cell -> {results_dir / name}")
    # The one cell, once, in one plain process: as a run of it with every option left as it comes.
    request = RunRequest(
        setup.config_for(config), (setup.cell,), CellPlacement(Launch(), (None,)),
        Schedule(repeats=1, seeds=None, vary_seed=False, cell_timeout=None, force=False), RunFolder(results_dir / name),
    )
    run = execute(request, output=output, progress=progress, estimate=False, announce=False)
    result = run.by_cell()[setup.cell]
    measured = measured_peak(result)
    predicted = candidate.prediction.device.total_bytes
    process = result.value(NVML_PROCESS_PEAK.name) if result.device_type == "cuda" else None
    return Verification(
        setup, run, result, predicted, candidate.device_total, measured,
        None if measured.bytes is None else error_percent(predicted, measured),
        process, None if process is None else process * MIB <= budget,
    )



__all__ = ["Fit", "Verification", "fit"]
