"""``estimate`` and ``fit``: predicted memory per cell, and the fastest setup that fits a budget.

Both trace one training step of each setup on fake tensors (see ``gputech_bench/estimate``);
nothing is allocated and no GPU is needed. A setup the tracer cannot follow is a row that
says why, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

from ..config import BenchConfig, from_dict
from ..errors import ConfigError
from ..results import CellResult, RunFolder
from ..units import MIB, parse_size
from ._display import rich_html, rich_text
from ._output import Output, output_or_default
from ._progress import trace_progress
from ._setup import Overrides, cuda_available, resolve_config

if TYPE_CHECKING:
    import pandas as pd

    from ..estimate.fit import Candidate, FitResult
    from ..estimate.measured import Measured
    from ..estimate.predict import Setup
    from ..estimate.render import EstimateReport
    from ._run import Run

PathLike = Union[str, Path]


# --------------------------------------------------------------------------- tracing


def _predict(setups, config: BenchConfig, jobs: int, output: Output | None):
    """Trace ``setups``; with ``output``, a progress bar on its console while they trace."""
    from ..estimate.predict import predict

    if output is None:
        return predict(setups, config, jobs)
    with trace_progress(output.console) as progress:
        task = progress.add_task("tracing on fake tensors", total=len(setups))
        return predict(setups, config, jobs, on_done=lambda prediction: progress.advance(task))


def build_estimate(
    config: BenchConfig, cells: list[str], jobs: int, budget: Optional[int], results: Optional[list[CellResult]],
    output: Output | None = None,
) -> "EstimateReport":
    """Trace ``cells`` and assemble the report; shared by ``estimate`` and ``run_matrix``."""
    from ..estimate.measured import measured_peak
    from ..estimate.overheads import DEFAULTS, calibrate
    from ..estimate.predict import setups_for
    from ..estimate.render import EstimateReport
    from ..estimate.trace import modelled_attention_note, trace_target

    target = trace_target()
    predictions = _predict(setups_for(cells, config), config, jobs, output)
    overheads = calibrate(results) if results else DEFAULTS
    measured = {}
    if results is not None:
        by_cell = {result.cell: result for result in results}
        measured = {cell: measured_peak(by_cell.get(cell)) for cell in cells}
    caveat = "; ".join(note for note in (target.caveat, modelled_attention_note(config, target)) if note) or None
    return EstimateReport(target.label, caveat, predictions, overheads, budget, measured, config.data.objective,
                          config.model.attention)


def _run_config(run_dir: Path) -> tuple[BenchConfig, list[CellResult]]:
    """A measured run's config and results, for ``estimate(compare=...)`` and ``fit(from_run=...)``."""
    folder = RunFolder(Path(run_dir))
    if not folder.config_path.is_file():
        raise ConfigError(f"'{run_dir}' holds no {folder.CONFIG}: pass a folder made by 'gputech-bench run'")
    saved = folder.read_config()
    if saved is None:
        raise ConfigError(f"{folder.config_path} is unreadable: re-run the cells into a new --run-name")
    return from_dict(saved), folder.load().results


def _run_path(run: "PathLike | Run") -> Path:
    return Path(getattr(run, "path", run))


def _device_memory(option: Optional[str]) -> Optional[int]:
    if option:
        return parse_size(option)
    if cuda_available():
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def _jobs(jobs: int) -> int:
    from ..estimate.predict import default_jobs

    if jobs < 0:
        raise ConfigError(f"--jobs {jobs}: pass 0 (one per core, up to 4) or a positive number")
    return jobs or default_jobs()


# --------------------------------------------------------------------------- estimate


class Estimate:
    """Predicted peak memory per cell: what ``estimate()`` returns.

    ``frame`` has a row per traced setup: memory by category (MiB), the tensor peak, the
    allocator reserve and CUDA context added to it, the device total, the host side, whether
    it fits the budget, and, against a measured run, the measured peak and the error in %.
    A setup the tracer could not follow has its reason in ``error`` and no figures.

    Example::

        >>> from gputech_bench import estimate
        >>> est = estimate(strategies=["1", "1+2+3"], preset="seed", device_memory="24GiB")
        >>> est.frame[["setup", "device_total_mib", "fits"]]
    """

    def __init__(self, report: "EstimateReport", config: BenchConfig) -> None:
        self.report = report
        self.config = config

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per setup; a fresh copy each time, so changing it changes nothing here."""
        import pandas as pd

        return pd.DataFrame(self.report.rows())

    @property
    def failed(self) -> list[str]:
        """The setups the tracer could not follow (each row's ``error`` says why)."""
        return [prediction.setup.label for prediction in self.report.predictions if prediction.error]

    def table(self, title: str | None = None):
        """The table ``gputech-bench estimate`` prints (a rich Table)."""
        from ..estimate.render import rich_table

        return rich_table(self.report, title=title or f"gputech-bench estimate: preset {self.config.preset} (MiB)")

    def legend(self) -> list[str]:
        """The lines under the table: what was traced, the overheads, and why a setup was not traced."""
        from ..estimate.render import legend

        return legend(self.report)

    def markdown(self) -> str:
        """The table as GitHub markdown, as ``estimate --format md`` prints it."""
        from ..estimate.render import markdown

        return markdown(self.report)

    def to_json(self) -> str:
        """Every prediction and row as JSON, as ``estimate --format json`` prints it."""
        from ..estimate.render import to_json

        return to_json(self.report)

    def _repr_html_(self) -> str:
        return rich_html(self.table(), *(f"  [dim]{line}[/]" for line in self.legend()))

    def __str__(self) -> str:
        return rich_text(self.table(), *(f"  {line}" for line in self.legend()))

    def __repr__(self) -> str:
        return f"<Estimate of {len(self.report.predictions)} setup(s), preset {self.config.preset}>"


def estimate(
    strategies: Union[str, Sequence[str], None] = None,
    *,
    matrix: bool = False,
    preset: Optional[str] = None,
    overrides: Overrides = None,
    model: Optional[str] = None,
    train_file: Optional[PathLike] = None,
    device_memory: Optional[str] = None,
    compare: "PathLike | Run | None" = None,
    jobs: int = 0,
    progress: bool = True,
    output: Output | None = None,
) -> Estimate:
    """Predict each cell's peak memory without a GPU: one training step traced on fake tensors.

    The same options as ``gputech-bench estimate``: ``strategies`` (a list such as
    ``["1", "1+2+3"]`` or the command line's ``"1,1+2+3"``; the baseline is always added) or
    ``matrix=True`` for the seed's 8 cells; ``preset``; ``overrides`` as a dict
    (``{"data.max_length": 512}``); ``model`` (only its config.json is read); ``train_file``;
    ``device_memory`` to judge what fits (``"24GiB"``; default: this GPU's, if any);
    ``compare``, a run folder or :class:`Run`, to use its config and put each prediction beside
    the measured peak; ``jobs`` trace processes (0: one per core, up to 4).

    A setup the tracer cannot follow is a row with its reason (``Estimate.failed``), never an
    exception; bad input raises :class:`UserError` (one line).

    Example::

        >>> from gputech_bench import estimate
        >>> est = estimate(matrix=True, preset="seed", device_memory="24GiB")
        >>> est                 # in a notebook: the table the command prints
        >>> est.frame           # a pandas DataFrame, one row per setup
    """
    from ..run.matrix import expand

    output = output_or_default(output)
    strategies = _strategies_text(strategies)
    results = None
    if compare is not None:
        if preset or overrides or model or train_file:
            raise ConfigError("--compare uses the run's own config: drop --preset, --set, --model and --train-file")
        config, results = _run_config(_run_path(compare))
        chosen = [result.cell for result in results]
        cells = expand(strategies, matrix, config) if (strategies or matrix) else chosen
    else:
        config = resolve_config(preset, overrides, model, Path(train_file) if train_file else None, None, "auto", output)
        cells = expand(strategies, matrix, config)
    budget = _device_memory(device_memory)
    if not cells:
        raise ConfigError(f"'{compare}' holds no cell results: run some cells first, or pass --strategies")
    report = build_estimate(config, cells, _jobs(jobs), budget, results, output if progress else None)
    return Estimate(report, config)


def _strategies_text(strategies: Union[str, Sequence[str], None]) -> Optional[str]:
    """The command line's comma-separated cells from a list (the API) or a string (either)."""
    if strategies is None or isinstance(strategies, str):
        return strategies
    items = list(strategies)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"strategies={strategies!r}: pass cell names such as ['1', '1+2+3'] or '1,1+2+3'")
    if not items:
        raise ConfigError("strategies=[] is empty: list cells such as ['1', '3', '1+2+3'], or pass matrix=True")
    return ",".join(items)


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
    when nothing fits; ``frame`` has a row per traced candidate with ``verdict`` ``best``,
    ``fits``, ``too big`` or ``not traced``; ``suggestions`` say what would fit when nothing does.

    Example::

        >>> from gputech_bench import fit
        >>> found = fit("8GiB", preset="seed")
        >>> found.best.cell, found.best.micro_batch_size
        >>> found.frame
    """

    def __init__(self, result: "FitResult", config: BenchConfig, not_searched: list[str],
                 verification: Optional[Verification] = None) -> None:
        self.result = result
        self.config = config
        #: Strategies left out because the tracer cannot follow them on this machine.
        self.not_searched = not_searched
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
    def suggestions(self) -> list[str]:
        return list(self.result.suggestions)

    def _row(self, candidate: "Candidate", verdict: str) -> dict[str, Any]:
        from ..estimate.fit import gives_up

        host = candidate.prediction.host
        time = candidate.time
        return {
            "verdict": verdict, "setup": candidate.setup.label, "cell": candidate.setup.cell,
            "micro_batch_size": candidate.setup.micro_batch_size,
            "device_gib": None if candidate.prediction.error else candidate.device_total / 2**30,
            "host_gib": None if host is None or candidate.prediction.error else host.total_bytes / 2**30,
            "epoch_seconds": time.seconds, "time_x_baseline": time.factor, "time_from": time.source,
            "gives_up": gives_up(candidate.setup), "error": candidate.prediction.error,
        }

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per traced candidate: the fitting ones fastest first, then those too big, then
        those the tracer could not follow (and, when nothing fits, the most frugal setup)."""
        import pandas as pd

        result = self.result
        rows = [self._row(candidate, "best" if rank == 0 else "fits") for rank, candidate in enumerate(result.chosen)]
        rows += [self._row(candidate, "too big") for candidate in result.rejected]
        if result.floor is not None and result.floor not in result.rejected:
            rows.append(self._row(result.floor, "too big"))
        rows += [self._row(candidate, "not traced") for candidate in result.untraceable]
        columns = ["verdict", "setup", "cell", "micro_batch_size", "device_gib", "host_gib", "epoch_seconds",
                   "time_x_baseline", "time_from", "gives_up", "error"]
        return pd.DataFrame(rows, columns=columns)

    def renderables(self) -> list[Any]:
        """What ``gputech-bench fit`` prints, in order: rich markup lines and the table of setups that fit."""
        from rich.table import Table

        from ..estimate.fit import gives_up

        result, config = self.result, self.config
        gib = lambda num: f"{num / 2**30:.2f}"  # noqa: E731
        untraceable = [f"  [yellow]not traced[/] {c.setup.label}: {c.prediction.error}" for c in result.untraceable]
        if result.floor is not None:
            return [
                *untraceable,
                f"[bold red]nothing fits {result.budget / 2**30:.1f} GiB[/]: the most frugal setup, "
                f"{result.floor.setup.label}, needs {gib(result.floor.device_total)} GiB",
                *(f"  would fit: {line}" for line in result.suggestions),
            ]
        table = Table(title=f"setups that fit {result.budget / 2**30:.1f} GiB, fastest first", title_justify="left")
        for header in ("", "setup", "device GiB", "host GiB", "time", "time from", "gives up"):
            # 'time from' and 'gives up' are prose: a narrow terminal folds them, never a figure or a name.
            table.add_column(header, justify="right" if "GiB" in header or header == "time" else "left",
                             overflow="fold" if header in ("time from", "gives up") else "ellipsis",
                             no_wrap=header == "setup")
        for rank, candidate in enumerate(result.chosen, start=1):
            time = candidate.time
            shown = f"{time.seconds:,.0f} s/epoch" if time.seconds is not None else f"{time.factor:.2f}x baseline"
            host = candidate.prediction.host
            table.add_row(
                "best" if rank == 1 else f"#{rank}", candidate.setup.label, gib(candidate.device_total),
                "-" if host is None else gib(host.total_bytes), shown, time.source, gives_up(candidate.setup),
            )
        parts: list[Any] = [table, *untraceable]
        if result.rejected:
            too_big = ", ".join(f"{c.setup.label} ({gib(c.device_total)} GiB)" for c in result.rejected)
            parts.append(f"  [dim]faster but too big: {too_big}[/]")
        parts.append(
            f"  [dim]device GiB = traced tensor peak + allocator reserve + CUDA context; "
            f"{result.untraced} slower candidate(s) not traced; objective {config.data.objective}, "
            f"attention {config.model.attention}[/]"
        )
        return parts

    def _repr_html_(self) -> str:
        return rich_html(*self.renderables())

    def __str__(self) -> str:
        return rich_text(*self.renderables())

    def __repr__(self) -> str:
        return f"<Fit {self.result.budget / 2**30:.1f} GiB: best {self.best.label if self.best else None}>"


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
    from ..estimate.fit import search, unsearchable
    from ..estimate.overheads import DEFAULTS, calibrate
    from ..estimate.trace import trace_target
    from ..strategies.registry import lookup

    output = output_or_default(output)
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
    else:
        config = resolve_config(preset, overrides, model, None, None, "auto", output)
    overheads = calibrate(run_results) if run_results else DEFAULTS
    workers = _jobs(jobs)
    excluded = {name.strip().lower() for name in exclude}
    device_type = trace_target().device.type
    left_out = [key for key in unsearchable(device_type) if key not in excluded]
    if left_out:
        output.say(f"[dim]not searched (the estimate cannot trace them here; measure them with 'run'): {', '.join(left_out)}[/]")
    shown = output if progress else None
    result = search(
        config, budget_bytes, overheads, lambda setups, cfg: _predict(setups, cfg, workers, shown),
        measured, config.strategy.micro_batch_size, top, excluded, parallel=workers, device_type=device_type,
    )
    found = Fit(result, config, left_out)
    if verify and found.fits:
        found.verification = _verify(result.chosen[0], config, Path(results), budget_bytes, output, progress)
    return found


def _verify(candidate: "Candidate", config: BenchConfig, results_dir: Path, budget: int, output: Output,
            progress: bool) -> Verification:
    """Run the chosen setup as a real cell and put its measurement next to the prediction."""
    from ..estimate.measured import error_percent, measured_peak
    from ._run import execute

    setup = candidate.setup
    name = f"fit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    output.say(f"verifying {setup.label} as a real cell -> {results_dir / name}")
    run = execute(setup.config_for(config), [setup.cell], results_dir, name, output=output, progress=progress,
                  estimate=False, announce=False)
    result = run.by_cell()[setup.cell]
    measured = measured_peak(result)
    predicted = candidate.prediction.device.total_bytes
    process = result.value("nvml_process_peak_mib") if result.device_type == "cuda" else None
    return Verification(
        setup, run, result, predicted, candidate.device_total, measured,
        None if measured.bytes is None else error_percent(predicted, measured),
        process, None if process is None else process * MIB <= budget,
    )


__all__ = ["Estimate", "Fit", "Verification", "build_estimate", "estimate", "fit"]
