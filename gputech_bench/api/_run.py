"""``run_matrix`` and ``load_run``: strategy cells run in isolated worker processes, and a run
folder read back, as one :class:`Run` object.

The command line's ``run`` and ``report`` call these, so a notebook and a terminal get the
same cells, the same statuses and the same table.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .. import estimator
from ..config import BenchConfig, from_dict
from ..errors import ConfigError, error_line, first_line
from ..estimator.measured import measured_peak
from ..results import CellResult, LoadedRun, RunFolder, cell_order
from ..results import load_run as load_results
from ..run.forkserver import ForkServer
from ..run.launch import Launch, gpu_slots
from ..measure.allocator import ALLOC_CONF_ENV, ALLOCATOR_CHOICES, NO_EFFECT_ON_CPU
from ..measure.allocator import DEFAULT as DEFAULT_ALLOCATOR
from ..run.launcher import WORKER_PRELOAD, Launcher, launcher_for
from ..run.request import CellPlacement, RunRequest, Schedule
from ..run.runner import Listeners, prepare_run_dir, run_cells
from ..run.shard import Shard, ShardLike, Sharding, ShardPlan, missing, missing_line, parse_shard
from ._display import show_figures_inline
from ._estimate import Estimate, build_estimate
from ._output import Output, output_or_default
from ._progress import MatrixProgress
from ._setup import Overrides, Selection, check_gpu_idle, override_texts, uses_cuda

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..report.frame import MemoryMeasure

PathLike = Union[str, Path]

#: What ``Run.plot`` draws, by name: the file names ``report --plot`` writes, without ``.png``.
PLOTS = ("memory_vs_time", "memory_breakdown", "accuracy")

#: What a CPU run's fork server imports once: the worker's stack, and the tracer that the
#: estimate after the run forks its traces with (named here, where both layers are known).
FORK_SERVER_PRELOAD = (*WORKER_PRELOAD, f"{estimator.__name__}.trace")


class Run:
    """A run: every cell's result, the comparison table as a pandas DataFrame, and its folder.

    ``run_matrix()`` returns one after running the cells; ``load_run(path)`` reads one back.
    ``frame`` is the DataFrame every export is made from (report.md/.csv/.json, the HTML
    report, the plots): a row per cell with every measured figure, its ratio to the baseline
    and the settings behind it. A failed cell is a row with its ``status`` and ``reason``.
    In a notebook the run shows as the table ``gputech-bench report`` prints.

    Example::

        >>> from gputech_bench import load_run
        >>> run = load_run("results/cpu-20261127-120000")
        >>> run                                   # the table, in a notebook
        >>> run.frame[["cell", "memory_mib", "epoch_seconds", "status"]]
        >>> run.failed                            # the cells that are not ok, with their reasons
        >>> run.plot("memory_vs_time")            # a matplotlib Figure, inline in a notebook
    """

    def __init__(
        self,
        loaded: LoadedRun,
        baseline: Optional[str] = None,
        *,
        seconds: Optional[float] = None,
        reused: Sequence[str] = (),
        interrupted: bool = False,
        cells_run: Sequence[str] = (),
        exports: Sequence[Path] = (),
        estimate: Optional[Estimate] = None,
        estimate_skipped: Optional[str] = None,
        output: Output | None = None,
        shard: Optional[Shard] = None,
    ) -> None:
        from ..report.frame import build_frame

        cells = [result.cell for result in loaded.results]
        if baseline is not None and baseline not in cells:
            raise ConfigError(f"baseline cell '{baseline}' is not in {loaded.root}: choose one of {', '.join(cells)}")
        self._loaded = loaded
        #: The cell the ratios and differences compare against. Without a 'baseline' cell and
        #: none named, those columns are empty rather than measured against another cell.
        self.baseline = baseline or "baseline"
        #: Wall time of the cells in seconds (a run just made; None for a loaded one).
        self.seconds = seconds
        #: Cells an earlier attempt of this run had finished, which were not run again.
        self.reused = list(reused)
        #: Whether Ctrl-C (or a kernel interrupt) stopped the run; the cells it stopped are rows.
        self.interrupted = interrupted
        #: The cells this call was asked to run (the folder may hold more from an earlier call).
        self.cells_run = list(cells_run) or cells
        #: report.md, report.csv and report.json as written beside the results.
        self.exports = list(exports)
        #: Why a run just made has no estimate (None when it has one, or was loaded).
        self.estimate_skipped = estimate_skipped
        #: This call's slice of a matrix split over machines (``shard="2/3"``); None when not split.
        self.shard = shard
        self._estimate = estimate
        self._estimate_known = estimate is not None or seconds is not None
        self._output = output
        self._frame, self._measure = build_frame(loaded.results, self.baseline)

    # ---- what it holds

    @property
    def path(self) -> Path:
        """The run folder."""
        return self._loaded.root

    @property
    def folder(self) -> RunFolder:
        """The run folder's files by name (``folder.result_path(cell)``, ``folder.log_path(cell)``...)."""
        return self._loaded.folder

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def results(self) -> list[CellResult]:
        """Every cell's result (figures with units and methods, provenance), in the table's order."""
        return list(self._loaded.results)

    @property
    def config(self) -> Optional[dict[str, Any]]:
        """The resolved config the run was made with (its config.json), or None when it is missing."""
        return self._loaded.config

    @property
    def problems(self) -> list[str]:
        """Files in the folder that were skipped, one line each."""
        return list(self._loaded.problems)

    @property
    def cells(self) -> list[str]:
        return [result.cell for result in self._loaded.results]

    @property
    def failed(self) -> dict[str, str]:
        """The cells that are not ok: ``{cell: "status: reason"}``."""
        return {r.cell: f"{r.status}: {r.reason or ''}".rstrip(": ") for r in self._loaded.results if not r.ok}

    @property
    def unfinished(self) -> list[str]:
        """The cells this call was asked to run that are not ok (interrupted, failed or never started):
        running again with the same ``run_name`` runs them."""
        by_cell = self._loaded.by_cell()
        return [cell for cell in self.cells_run if cell not in by_cell or not by_cell[cell].ok]

    @property
    def ok(self) -> bool:
        """Whether every cell is ok."""
        return not self.failed

    @property
    def missing(self) -> list[tuple[str, Shard]]:
        """For a matrix split over machines (``run --shard K/N``): the cells of the split that have
        no result in the folder yet, each with the shard that runs it; empty otherwise."""
        return missing(self._loaded.folder, self.cells)

    @property
    def missing_line(self) -> Optional[str]:
        """``missing: 4, lora (shard 2/3)``, or None when no cell of a split is missing."""
        cells = self.missing
        return missing_line(cells) if cells else None

    def by_cell(self) -> dict[str, CellResult]:
        return self._loaded.by_cell()

    @property
    def frame(self) -> "pd.DataFrame":
        """The comparison table as a pandas DataFrame: a fresh copy each time, so that changing
        it never changes what this run shows or exports."""
        return self._frame.copy()

    @property
    def measure(self) -> "MemoryMeasure":
        """Which figure the memory column holds (``metric``) and its label."""
        return self._measure

    @property
    def estimate(self) -> Optional[Estimate]:
        """The fake-tensor estimate of each cell against what was measured: made by
        ``run_matrix``, or read from the folder's estimate.json; None when there is none."""
        if not self._estimate_known:
            self._estimate_known = True
            self._estimate = _saved_estimate(self._loaded, output_or_default(self._output))
        return self._estimate

    def with_baseline(self, cell: str) -> "Run":
        """The same run with ratios and differences against ``cell`` instead of the baseline."""
        return Run(self._loaded, cell, output=self._output, shard=self.shard)

    # ---- how it shows

    def render(self, fmt: str = "md") -> str:
        """The run as ``report --format`` writes it: ``md``, ``csv``, ``json`` or ``html``."""
        from ..report.export import FORMATS, render

        if fmt not in FORMATS:
            raise ConfigError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")
        rendered = render(self._loaded, fmt, self.baseline)
        assert isinstance(rendered, str)
        return rendered

    def plot(self, kind: str = "memory_vs_time") -> "Figure":
        """One of the run's plots as a matplotlib Figure (shown inline in a notebook):
        ``memory_vs_time`` (with the Pareto frontier), ``memory_breakdown`` (where the memory
        goes) or ``accuracy`` (spread over repeats; only for a run made with ``repeat`` > 1)."""
        from ..report import plots

        figure: Optional[Figure]  # the accuracy plot's is None for a run without repeats
        if kind == "memory_vs_time":
            figure = plots.memory_time_chart(self._frame, self._measure, self.baseline, run_name=self.name)
        elif kind == "memory_breakdown":
            figure = plots.memory_breakdown_chart(self._loaded, self._frame, self._measure)
        elif kind == "accuracy":
            figure = plots.accuracy_chart(self._loaded, self._frame)
            if figure is None:
                raise ConfigError("no accuracy plot: no cell was repeated; run with repeat=3 (--repeat 3) to see the spread")
        else:
            raise ConfigError(f"unknown plot '{kind}': choose one of {', '.join(PLOTS)}")
        show_figures_inline()
        return figure

    def write_plots(self, folder: PathLike) -> list[Path]:
        """Every plot of the run as a PNG file in ``folder`` (made if missing), as ``report --plot`` writes them."""
        from ..report.plots import write_plots

        return write_plots(self._loaded, Path(folder), self.baseline)

    def _repr_html_(self) -> str:
        from ..report.html import notebook_html

        return notebook_html(self._loaded, self._frame, self._measure, self.baseline)

    def __str__(self) -> str:
        # The markdown report (the terminal's rich table is the command line's: cli/tables.py),
        # then each cell's notes, as ``run`` prints them under its table.
        notes = [f"{result.cell}: {note}" for result in self._loaded.results for note in result.notes]
        return "\n".join([self.render("md").rstrip("\n"), *notes])

    def __repr__(self) -> str:
        failed = f", failed={list(self.failed)}" if self.failed else ""
        return f"<Run {self.name}: cells={self.cells}{failed}, path='{self.path}'>"


def _saved_estimate(loaded: LoadedRun, output: Output) -> Optional[Estimate]:
    """The run's saved estimate against its results, or None (a warning when it is unreadable).

    A run split over machines has one estimate per shard (``RUN/shards/``), each of its own
    cells: they are read as one, unless an estimate.json of the whole run is there."""
    from ..estimator.render import read_estimate

    folder = loaded.folder
    if folder.estimate_path.is_file():
        sources = [folder]
    else:  # estimate.2-of-3.json -> the folder as shard 2-of-3 writes it
        sources = [folder.for_shard(path.name.removeprefix("estimate.").removesuffix(".json"))
                   for path in folder.shard_estimate_paths()]
    if not sources:
        return None
    reports = []
    for source in sources:
        path = source.estimate_path
        try:
            reports.append(read_estimate(source))
        except (OSError, ValueError, KeyError, TypeError) as error:
            output.warn(f"{path} is unreadable ({first_line(error)}): "
                        f"'gputech-bench estimate --compare {loaded.root}' makes the run's estimate again")
    if not reports:
        return None
    saved = _merged_estimates(reports)
    by_cell = loaded.by_cell()
    measured = {p.setup.cell: measured_peak(by_cell.get(p.setup.cell)) for p in saved.predictions}
    import dataclasses

    try:
        config = from_dict(loaded.config) if loaded.config is not None else BenchConfig()
    except ConfigError:
        config = BenchConfig()
    return Estimate(dataclasses.replace(saved, measured=measured), config)


def _merged_estimates(reports: list[Any]) -> Any:
    """One estimate from the shards' (each of its own cells), in the table's order; the first
    shard's overheads and notes stand for all."""
    import dataclasses

    if len(reports) == 1:
        return reports[0]
    predictions: dict[str, Any] = {}
    for report in reports:
        for prediction in report.predictions:
            predictions.setdefault(prediction.setup.cell, prediction)
    ordered = [predictions[cell] for cell in sorted(predictions, key=cell_order)]
    return dataclasses.replace(reports[0], predictions=ordered)


def load_folder(path: PathLike, output: Output) -> LoadedRun:
    """A run folder's results; each file skipped is a warning."""

    loaded = load_results(Path(path))
    for problem in loaded.problems:
        output.warn(problem)
    return loaded


def load_run(path: PathLike, baseline: Optional[str] = None, *, output: Output | None = None) -> Run:
    """An existing run folder as a :class:`Run`, the object ``run_matrix`` returns.

    Files in the folder that are not readable cell results are skipped with a warning
    (``Run.problems`` lists them); a folder with no result raises :class:`UserError`.
    ``baseline`` is the cell the ratios and differences compare against (default: the
    ``baseline`` cell; a folder without one has those columns empty).

    Example::

        >>> from gputech_bench import load_run
        >>> run = load_run("results/cpu-20261127-120000")
        >>> run.frame.set_index("cell")["epoch_x_baseline"]
        >>> print(run.render("md"))
    """
    output = output_or_default(output)
    return Run(load_folder(path, output), baseline, output=output)


def run_matrix(
    strategies: Union[str, Sequence[str], None] = None,
    *,
    matrix: bool = False,
    preset: Optional[str] = None,
    overrides: Overrides = None,
    model: Optional[str] = None,
    train_file: Optional[PathLike] = None,
    eval_file: Optional[PathLike] = None,
    device: str = "auto",
    results: PathLike = "results",
    run_name: Optional[str] = None,
    repeat: int = 1,
    vary_seed: bool = False,
    cell_timeout: Optional[float] = None,
    force: bool = False,
    allow_busy_gpu: bool = False,
    gpu_memory_limit: Optional[str] = None,
    memory_snapshot: bool = False,
    gpus: Optional[str] = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: Optional[str] = None,
    estimate: bool = True,
    progress: bool = True,
    output: Output | None = None,
    allocator: str = "default",
    shard: ShardLike = None,
) -> Run:
    """Run strategy cells, each in its own worker process, and return the :class:`Run`.

    The same options as ``gputech-bench run``, as keywords: ``strategies`` (a list such as
    ``["1", "3", "1+2+3"]``, or the command line's ``"1,3,1+2+3"``; the baseline is always
    added) or ``matrix=True`` for the seed's 8 cells; ``preset`` (default: ``seed`` with CUDA,
    ``cpu`` without); ``overrides``, the ``--set`` pairs as a dict (``{"train.max_steps": 4}``);
    ``model``; ``train_file`` and ``eval_file``; ``device`` (auto, cuda or cpu); ``results``
    and ``run_name`` (the run folder is ``results/run_name``; running again with the same
    name skips the cells already ok, ``force=True`` re-runs them); ``repeat`` and ``vary_seed``;
    ``cell_timeout`` in seconds; and the GPU options ``allow_busy_gpu``, ``gpu_memory_limit``,
    ``memory_snapshot``, ``gpus``, ``nproc_per_node``, ``nnodes``, ``node_rank`` and
    ``rdzv_endpoint``; ``allocator`` (``"default"`` leaves the inherited PYTORCH_CUDA_ALLOC_CONF
    alone, ``"expandable"`` sets ``expandable_segments:True`` in every cell, keeping the inherited
    conf's other options). ``estimate=False`` skips the fake-tensor estimate made after the cells;
    ``progress=False`` prints nothing while it runs; ``output`` (an ``api.Output``) takes the
    consoles that messages and warnings go to (the command line passes its own).
    ``shard`` (``"2/3"`` or ``(2, 3)``, as ``--shard``) runs only the K-th of N round-robin slices
    of the cells (the baseline is in slice 1) into the shared folder ``results/run_name``, which
    it then needs: every machine of a split matrix passes the same cells, config, ``run_name`` and N.

    A cell that fails (out of memory, an error, a crash, a timeout, Ctrl-C) is a row with its
    status and reason, never an exception. Bad input raises :class:`UserError`, one line
    naming the problem and the fix, before any process starts; its messages name the command
    line's options (``--allow-busy-gpu`` is ``allow_busy_gpu=True`` here).

    Example::

        >>> from gputech_bench import run_matrix
        >>> run = run_matrix(strategies=["1"], preset="cpu", device="cpu", overrides={"train.max_steps": 4})
        >>> print(run.frame[["cell", "memory_mib", "epoch_seconds", "status"]])
    """
    output = output_or_default(output)
    parsed_shard = parse_shard(shard)
    if parsed_shard is not None and not run_name:
        raise ConfigError(f"--shard {parsed_shard.label} needs --run-name NAME, the same on every shard: "
                          "all shards write into one run folder")
    for option, value, least in (("--repeat", repeat, 1), ("--nproc-per-node", nproc_per_node, 1),
                                 ("--nnodes", nnodes, 1), ("--node-rank", node_rank, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{option} {value!r}: pass a whole number of at least {least}")
    if cell_timeout is not None and not (isinstance(cell_timeout, (int, float)) and cell_timeout >= 1):
        raise ConfigError(f"--cell-timeout {cell_timeout!r}: pass a number of seconds, at least 1")
    extra = [f"gpu_memory_limit={gpu_memory_limit}"] if gpu_memory_limit else []
    extra += ["memory_snapshot=true"] if memory_snapshot else []
    selection = Selection(strategies, matrix, preset, _with_extra(overrides, extra), model, _path(train_file),
                          _path(eval_file), device)
    config = selection.config(output)
    cuda = uses_cuda(config)
    if (config.gpu_memory_limit or config.memory_snapshot) and not cuda:
        raise ConfigError("--gpu-memory-limit and --memory-snapshot need a CUDA device: drop them on this machine")
    if allocator not in ALLOCATOR_CHOICES:
        raise ConfigError(f"unknown --allocator '{allocator}': choose one of {', '.join(ALLOCATOR_CHOICES)}")
    if allocator != DEFAULT_ALLOCATOR and not cuda:
        output.note(f"{NO_EFFECT_ON_CPU} (recorded in each result all the same)")
    cells = selection.cells(config, cuda)
    launch = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    launch.check()
    if gpus is not None and not cuda:
        raise ConfigError("--gpus needs CUDA devices and this run has none: drop --gpus, or run on a GPU machine")
    slots = gpu_slots(gpus, nproc_per_node)
    if vary_seed and repeat < 2:
        raise ConfigError("--vary-seed needs --repeat 2 or more: each repeat takes the next seed")
    seeds = tuple(config.train.seed + (k if vary_seed else 0) for k in range(repeat))
    if cuda:
        check_gpu_idle(allow_busy_gpu, gpus, output)
    name = run_name or f"{config.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    sharding = None
    if parsed_shard is not None:
        plan = ShardPlan(parsed_shard.count, tuple(cells), repeat, seeds if repeat > 1 else None)
        plan.check(parsed_shard)
        sharding = Sharding(parsed_shard, plan)
    request = RunRequest(
        config, sharding.cells if sharding else tuple(cells), CellPlacement(launch, tuple(slots)),
        Schedule(repeat, seeds if repeat > 1 else None, vary_seed, cell_timeout, force),
        RunFolder(Path(results) / name, parsed_shard.tag if parsed_shard else None), allocator, sharding,
    )
    return execute(request, output=output, progress=progress, estimate=estimate)


def _path(value: Optional[PathLike]) -> Optional[Path]:
    return None if value is None else Path(value)


def _with_extra(overrides: Overrides, extra: list[str]) -> Overrides:
    """The user's overrides, then the settings that options such as --gpu-memory-limit stand for."""
    if not extra:
        return overrides

    return [*override_texts(overrides), *extra]


def execute(request: RunRequest, *, output: Output, progress: bool, estimate: bool, announce: bool = True) -> Run:
    """Run the request's cells, then write the report files and (``estimate``) the fake-tensor
    estimate. Shared by ``run_matrix`` and ``fit(verify=True)``; ``announce`` says what runs first."""
    config, folder, launch, schedule = request.config, request.folder, request.launch, request.schedule
    prepare_run_dir(request)
    if announce:
        output.say(f"run [bold]{request.name}[/]: {len(request.cells)} cell(s), preset {config.preset} -> {folder.root}")
        if request.sharding is not None:
            sharding = request.sharding
            output.say(f"shard {sharding.shard.label}: {', '.join(sharding.cells)} "
                       f"(of {len(sharding.plan.cells)} cells dealt round-robin over {sharding.shard.count} shards)")
        if launch.distributed:
            output.say(f"each cell: {launch.world_size} rank(s) via torchrun "
                       f"({launch.nproc_per_node} per node x {launch.nnodes} node(s))")
        if len(request.slots) > 1:
            output.say(f"{len(request.slots)} cells at a time: "
                       + ", ".join(f"GPU {','.join(slot)}" for slot in request.slots if slot))
        for name, value in request.cell_environment().items():
            if name == ALLOC_CONF_ENV:
                output.say(f"each cell: {name}={value} (--allocator {request.allocator})")
        seeds = schedule.seeds
        if schedule.repeats > 1 and seeds:
            how = (f"seeds {seeds[0]}..{seeds[-1]}" if schedule.vary_seed
                   else f"seed {seeds[0]} each time: the spread is timing noise")
            output.say(f"each cell {schedule.repeats} times, in a fresh process each, round-robin ({how})")

    # CPU cells are forked from one preloaded server; a CUDA cell or a torchrun launch starts a
    # fresh interpreter. The server lives until the estimate, which forks its traces from it too.
    launcher = launcher_for(launch, uses_cuda(config), folder.fork_server_log_path, FORK_SERVER_PRELOAD)
    try:
        return _execute_cells(request, launcher, output=output, progress=progress, estimate=estimate)
    finally:
        launcher.close()


def _execute_cells(request: RunRequest, launcher: Launcher, *, output: Output, progress: bool, estimate: bool) -> Run:
    from ..report.export import write_exports

    folder = request.folder
    if progress:
        with MatrixProgress(len(request.cells) * request.schedule.repeats, output.console) as shown:
            outcome = run_cells(request, launcher, Listeners(shown.event, shown.cell_started, shown.cell_finished))
    else:
        outcome = run_cells(request, launcher)
    if outcome.reused:
        output.say(f"reused {len(outcome.reused)} finished cell(s): {', '.join(outcome.reused)} (--force re-runs them)")

    exports: list[Path] = []
    try:
        loaded, exports = _write_settled_exports(folder, write_exports)
    except OSError as error:
        loaded = load_folder(folder.root, output)
        output.warn(f"could not write the report files ({error}); the cell results are in {folder.root}")
    else:
        for problem in loaded.problems:
            output.warn(problem)

    server = launcher.fork_server
    if server is not None and server.failure:
        output.note(f"cells started as fresh interpreters: {server.failure}")

    made, skipped = None, None
    if not estimate:
        skipped = "not asked for"
    elif request.launch.distributed:
        skipped = "it traces one process with the whole batch, not a rank's share"
    elif outcome.interrupted:
        skipped = "the run was interrupted"
    else:
        made = _estimate_run(request, outcome.results, output, progress, server)
        if made is None:
            skipped = "the trace failed (see the warning)"
    return Run(loaded, seconds=outcome.seconds, reused=outcome.reused, interrupted=outcome.interrupted,
               cells_run=request.cells, exports=exports, estimate=made,
               estimate_skipped=skipped, output=output,
               shard=request.sharding.shard if request.sharding else None)


#: How often the report files are written again when results changed meanwhile.
SETTLE_ATTEMPTS = 10


def _write_settled_exports(folder: RunFolder, write: Any) -> tuple[LoadedRun, list[Path]]:
    """report.md/.csv/.json from every result in the folder, written again until no result
    changed while they were made. Each write is atomic; with shards on other machines
    finishing at the same time, whichever shard writes last has checked that it saw every
    result written before its check, and a result written after that check is followed by
    its own shard's exports: the files end up holding every cell."""
    for _ in range(SETTLE_ATTEMPTS):
        before = folder.result_stamps()
        loaded = load_results(folder.root)
        exports = write(loaded)
        if folder.result_stamps() == before:
            break
    return loaded, exports


def _estimate_run(request: RunRequest, results: list[CellResult], output: Output, progress: bool,
                  fork_server: ForkServer | None) -> Optional[Estimate]:
    """The predicted-against-measured estimate after a run, saved as estimate.json; traced in
    children of the run's ``fork_server`` when it has one. A failing estimate is a warning:
    the measured results are what the run is for."""
    from ..estimator.predict import ForkedTraces, default_jobs
    from ..estimator.render import write_estimate

    folder = request.folder
    cells = [result.cell for result in results]
    try:
        forked = None if fork_server is None else ForkedTraces(fork_server, folder.estimate_log_path)
        # A fresh trace process costs an import of torch and transformers (~5 s): not for two
        # cells. A forked one (the run's fork server on CPU) costs a fork.
        jobs = default_jobs() if forked is not None or len(cells) > 2 else 1
        report = build_estimate(request.config, cells, jobs, None, results, output if progress else None, forked=forked)
        write_estimate(folder, report)
    except Exception as error:  # noqa: BLE001 - never lose a finished run to its estimate
        output.warn(f"no memory estimate ({error_line(error)}); "
                    f"'gputech-bench estimate --compare {folder.root}' retries it")
        return None
    return Estimate(report, request.config)


__all__ = ["PLOTS", "Run", "execute", "load_folder", "load_run", "run_matrix"]
