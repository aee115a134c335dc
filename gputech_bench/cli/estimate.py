"""``gputech-bench estimate`` and ``gputech-bench fit``; registered on the main app by cli/__init__.py."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import BenchConfig, from_dict, to_dict
from ..errors import ConfigError, StrategyError, UserError, error_line, first_line
from ..estimate.measured import error_percent, measured_peak
from ..estimate.overheads import DEFAULTS, calibrate
from ..results import CellResult, RunFolder
from ..run.forkserver import ForkServerError
from ..run.runner import prepare_run_dir, run_matrix
from ..units import GIB, MIB, format_gib, parse_size
from .common import (
    EXIT_FAILED_CELL,
    MODEL_OPTION,
    MORE_HINT,
    PRESET_OPTION,
    SET_OPTION,
    TRAIN_FILE_OPTION,
    console,
    cuda_available,
    emit,
    errors,
    fail,
    print_table,
    resolve_config,
)

ESTIMATE_HELP = """Predict each cell's peak memory without a GPU: one training step traced on fake tensors.

The real model, strategies and training step run under PyTorch's FakeTensorMode, so
nothing is allocated; MemTracker counts parameters, gradients, optimizer state,
activations and temporaries. The CUDA context and the allocator's reserve are added as
labelled lines (calibrated from a measured run with --compare).

**Examples**

* `gputech-bench estimate --matrix --preset seed --device-memory 24GiB` - will the seed's cells fit a 24 GiB card?
* `gputech-bench estimate --strategies 1,1+2+3 --preset seed --set data.max_length=512`
* `gputech-bench estimate --compare results/seed-20261127-120000` - predicted against measured, error in %
"""

FIT_HELP = """Find the fastest setup predicted to fit a memory budget.

Tries every strategy combination the registry allows, and micro-batch sizes 16x2, 8x4,
4x8 and 2x16 for accumulation, keeping the effective batch. Time comes from a measured
run (--from) or a labelled cost model.

**Examples**

* `gputech-bench fit --budget 24GiB --preset seed`
* `gputech-bench fit --budget 8GB --preset seed --from results/seed-20261127-120000` - times from a measured run
* `gputech-bench fit --budget 6GiB --preset cpu --verify` - and run the winner to check the prediction
"""


def _trace_progress(total: int) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )


def _predict(setups, config: BenchConfig, jobs: int, forks=None, log_path: Optional[Path] = None):
    from ..estimate.predict import predict

    with _trace_progress(len(setups)) as progress:
        task = progress.add_task("tracing on fake tensors", total=len(setups))
        return predict(setups, config, jobs, on_done=lambda prediction: progress.advance(task), forks=forks, log_path=log_path)


def _load_run(run_dir: Path) -> tuple[BenchConfig, list[CellResult]]:
    folder = RunFolder(run_dir)
    if not folder.config_path.is_file():
        raise ConfigError(f"'{run_dir}' holds no {folder.CONFIG}: pass a folder made by 'gputech-bench run'")
    saved = folder.read_config()
    if saved is None:
        raise ConfigError(f"{folder.config_path} is unreadable: re-run the cells into a new --run-name")
    return from_dict(saved), folder.load().results


def _device_memory(option: Optional[str]) -> Optional[int]:
    if option:
        return parse_size(option)
    if cuda_available():
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def build_estimate(
    config: BenchConfig, cells: list[str], jobs: int, budget: Optional[int], results: Optional[list[CellResult]],
    forks=None, log_path: Optional[Path] = None,
):
    """Trace ``cells`` and assemble the report; shared by ``estimate`` and ``run`` (which
    passes its fork server, whose children trace without importing anything)."""
    from ..estimate.predict import setups_for
    from ..estimate.render import EstimateReport

    label, caveat = _describe_target(config, forks, log_path)
    predictions = _predict(setups_for(cells, config), config, jobs, forks, log_path)
    overheads = calibrate(results) if results else DEFAULTS
    measured = {}
    if results is not None:
        by_cell = {result.cell: result for result in results}
        measured = {cell: measured_peak(by_cell.get(cell)) for cell in cells}
    return EstimateReport(label, caveat, predictions, overheads, budget, measured, config.data.objective,
                          config.model.attention)


def _describe_target(config: BenchConfig, forks, log_path: Optional[Path]) -> tuple[str, Optional[str]]:
    """The traces' target and caveats; asked of a forked child when there is a fork server,
    so that this process never imports the tracer's stack (torch's fake tensors, transformers)."""
    if forks is not None and log_path is not None and forks.start():
        import json


        try:
            with log_path.open("a", encoding="utf-8") as log:
                described = json.loads(forks.output("gputech_bench.estimate.trace:describe_target_in_child",
                                                    [json.dumps(to_dict(config))], log.fileno()))
            return described["label"], described["caveat"]
        except (ForkServerError, ValueError, KeyError):
            pass  # described here instead
    from ..estimate.trace import describe_target

    return describe_target(config)


def estimate_run(config: BenchConfig, results: list[CellResult], folder: RunFolder, forks=None) -> None:
    """The predicted-against-measured table after ``run``. A failing estimate is a warning:
    the measured results are what the run is for.

    ``forks``, the run's fork server (CPU runs), traces in children forked from it."""
    from ..estimate.predict import default_jobs
    from ..estimate.render import write_estimate

    cells = [result.cell for result in results]
    try:
        # A fresh trace process costs an import of torch and transformers (~5 s): not for two
        # cells. A forked one costs a fork.
        jobs = default_jobs() if forks is not None or len(cells) > 2 else 1
        report = build_estimate(config, cells, jobs, None, results, forks, folder.estimate_log_path)
        write_estimate(folder, report)
    except Exception as error:  # noqa: BLE001 - never lose a finished run to its estimate
        errors.print(f"[yellow]warning:[/] no memory estimate ({error_line(error)}); "
                     f"'gputech-bench estimate --compare {folder.root}' retries it", highlight=False)
        return
    _print_against_measured(report)


def _print_against_measured(report) -> None:
    from ..estimate.render import legend
    from .tables import compact_estimate_table

    print_table(compact_estimate_table(report, title="predicted (fake-tensor trace) against measured, MiB"))
    for line in legend(report, with_overheads=False):
        console.print(f"  [dim]{line}[/]", highlight=False)
    console.print("  [dim]categories, CUDA context and allocator reserve: 'gputech-bench estimate --compare RUN_DIR'[/]", highlight=False)


def show_saved_estimate(loaded) -> None:
    """The run's saved estimate against its results, under ``report``'s table (if there is one)."""
    from ..estimate.render import read_estimate

    if not loaded.folder.estimate_path.is_file():
        return
    try:
        saved = read_estimate(loaded.folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        errors.print(f"[yellow]warning:[/] {loaded.folder.estimate_path} is unreadable ({first_line(error)}): "
                     f"'gputech-bench estimate --compare {loaded.root}' makes it again", highlight=False)
        return
    by_cell = loaded.by_cell()
    measured = {p.setup.cell: measured_peak(by_cell.get(p.setup.cell)) for p in saved.predictions}
    _print_against_measured(dataclasses.replace(saved, measured=measured))


def estimate(
    matrix: bool = typer.Option(False, "--matrix", help="The seed's 8 cells."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated cells, as for 'run'; the baseline is always added."),
    preset: Optional[str] = PRESET_OPTION,
    set_: List[str] = SET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    train_file: Optional[Path] = TRAIN_FILE_OPTION,
    device_memory: Optional[str] = typer.Option(None, help="Memory to fit, e.g. 24GiB or 24GB; default: this GPU's, if any."),
    compare: Optional[Path] = typer.Option(None, help="A run folder: use its config, and show predicted against measured."),
    jobs: int = typer.Option(0, min=0, help="Processes tracing in parallel; 0 = one per core, up to 4."),
    format_: str = typer.Option("table", "--format", help="table, md or json."),
    output: Optional[Path] = typer.Option(None, help="Write to this file instead of the terminal."),
) -> None:
    from ..estimate.predict import default_jobs
    from ..estimate.render import legend, markdown, to_json
    from ..run.matrix import expand
    from .tables import estimate_table

    if format_ not in ("table", "md", "json"):
        fail(f"unknown --format '{format_}': choose table, md or json")
    results = None
    try:
        if compare is not None:
            if preset or set_ or model or train_file:
                raise ConfigError("--compare uses the run's own config: drop --preset, --set, --model and --train-file")
            config, results = _load_run(compare)
            chosen = [result.cell for result in results]
            cells = expand(strategies, matrix, config) if (strategies or matrix) else chosen
        else:
            config = resolve_config(preset, set_, model, train_file, None, "auto")
            cells = expand(strategies, matrix, config)
        budget = _device_memory(device_memory)
    except ValueError as error:
        fail(str(error))
    if not cells:
        fail(f"'{compare}' holds no cell results: run some cells first, or pass --strategies")
    try:
        report = build_estimate(config, cells, jobs or default_jobs(), budget, results)
    except UserError as error:
        fail(str(error))
    except Exception as error:  # a model or strategy the tracer cannot follow
        errors.print(f"[bold red]error:[/] the trace failed ({error_line(error)})", highlight=False)
        raise typer.Exit(EXIT_FAILED_CELL)
    if format_ == "json":
        emit(to_json(report), output)
    elif format_ == "md" or output is not None:
        emit(markdown(report), output)
    else:
        print_table(estimate_table(report, title=f"gputech-bench estimate: preset {config.preset} (MiB)"), hint=MORE_HINT)
        for line in legend(report):
            console.print(f"  [dim]{line}[/]", highlight=False)
    if any(prediction.error for prediction in report.predictions):
        raise typer.Exit(EXIT_FAILED_CELL)


def _print_fit(result, config: BenchConfig) -> None:
    from rich.table import Table

    from ..estimate.fit import gives_up

    gib = lambda num: f"{num / GIB:.2f}"  # noqa: E731
    if result.floor is not None:
        for candidate in result.untraceable:
            console.print(f"  [yellow]not traced[/] {candidate.setup.label}: {candidate.prediction.error}", highlight=False)
        console.print(
            f"[bold red]nothing fits {format_gib(result.budget)}[/]: the most frugal setup, "
            f"{result.floor.setup.label}, needs {gib(result.floor.device_total)} GiB", highlight=False,
        )
        for line in result.suggestions:
            console.print(f"  would fit: {line}", highlight=False)
        return
    table = Table(title=f"setups that fit {format_gib(result.budget)}, fastest first", title_justify="left")
    for header in ("", "setup", "device GiB", "host GiB", "time", "time from", "gives up"):
        # 'time from' and 'gives up' are prose: a narrow terminal folds them, never a figure or a name.
        table.add_column(header, justify="right" if "GiB" in header or header == "time" else "left",
                         overflow="fold" if header in ("time from", "gives up") else "ellipsis", no_wrap=header == "setup")
    for rank, candidate in enumerate(result.chosen, start=1):
        time = candidate.time
        shown = f"{time.seconds:,.0f} s/epoch" if time.seconds is not None else f"{time.factor:.2f}x baseline"
        host = candidate.prediction.host
        table.add_row(
            "best" if rank == 1 else f"#{rank}", candidate.setup.label, gib(candidate.device_total),
            "-" if host is None else gib(host.total_bytes), shown, time.source, gives_up(candidate.setup),
        )
    print_table(table)
    if result.untraceable:
        for candidate in result.untraceable:
            console.print(f"  [yellow]not traced[/] {candidate.setup.label}: {candidate.prediction.error}", highlight=False)
    if result.rejected:
        too_big = ", ".join(f"{c.setup.label} ({gib(c.device_total)} GiB)" for c in result.rejected)
        console.print(f"  [dim]faster but too big: {too_big}[/]", highlight=False)
    console.print(
        f"  [dim]device GiB = traced tensor peak + allocator reserve + CUDA context; "
        f"{result.untraced} slower candidate(s) not traced; objective {config.data.objective}, "
        f"attention {config.model.attention}[/]", highlight=False,
    )


def fit(
    budget: str = typer.Option(..., help="Device memory to fit, e.g. 24GiB or 24GB (GB = 10^9 bytes, GiB = 2^30)."),
    preset: Optional[str] = PRESET_OPTION,
    set_: List[str] = SET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    from_: Optional[Path] = typer.Option(None, "--from", help="A measured run folder: its times and overheads, and its config."),
    exclude: List[str] = typer.Option([], help="Leave a strategy out of the search, e.g. --exclude lora (repeatable)."),
    top: int = typer.Option(3, min=1, help="How many fitting setups to list."),
    verify: bool = typer.Option(False, "--verify", help="Run the best setup as a real cell and check the prediction."),
    results_dir: Path = typer.Option(Path("results"), "--results", help="Where --verify writes its run."),
    jobs: int = typer.Option(0, min=0, help="Processes tracing in parallel; 0 = one per core, up to 4."),
) -> None:
    from ..estimate.fit import search, unsearchable
    from ..estimate.predict import default_jobs
    from ..estimate.trace import trace_target
    from ..strategies.registry import lookup

    measured: dict[str, dict[str, Any]] = {}
    results = None
    try:
        budget_bytes = parse_size(budget)
        for name in exclude:
            lookup(name)
        if from_ is not None:
            if preset or set_ or model:
                raise ConfigError("--from uses the run's own config: drop --preset, --set and --model")
            config, results = _load_run(from_)
            measured = {result.cell: result for result in results}
        else:
            config = resolve_config(preset, set_, model, None, None, "auto")
    except (ValueError, StrategyError) as error:
        fail(str(error))
    overheads = calibrate(results) if results else DEFAULTS
    workers = jobs or default_jobs()
    excluded = {name.strip().lower() for name in exclude}
    device_type = trace_target().device.type
    left_out = [key for key in unsearchable(device_type) if key not in excluded]
    if left_out:
        console.print(
            f"[dim]not searched (the estimate cannot trace them here; measure them with 'run'): {', '.join(left_out)}[/]",
            highlight=False,
        )
    try:
        result = search(
            config, budget_bytes, overheads, lambda setups, cfg: _predict(setups, cfg, workers),
            measured, config.strategy.micro_batch_size, top, excluded, parallel=workers, device_type=device_type,
        )
    except UserError as error:
        fail(str(error))
    _print_fit(result, config)
    if result.floor is not None:
        raise typer.Exit(EXIT_FAILED_CELL)
    if verify:
        _verify(result.chosen[0], config, results_dir, budget_bytes)


def _verify(candidate, config: BenchConfig, results_dir: Path, budget: int) -> None:
    """Run the chosen setup as a real cell and put its measurement next to the prediction."""
    setup = candidate.setup
    cell_config = setup.config_for(config)
    name = f"fit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = RunFolder(results_dir / name)
    try:
        prepare_run_dir(folder, cell_config, force=False)
    except ConfigError as error:
        fail(str(error))
    console.print(f"verifying {setup.label} as a real cell -> {folder.root}", highlight=False)
    outcome = run_matrix([setup.cell], folder)
    result = outcome.results[0]
    measured = measured_peak(result)
    predicted = candidate.prediction.device.total_bytes
    if measured.bytes is None:
        console.print(f"  {setup.label}: {result.status} - nothing to compare ({measured.what}); {result.reason or ''}", highlight=False)
        raise typer.Exit(EXIT_FAILED_CELL)
    error = error_percent(predicted, measured)
    console.print(
        f"  {setup.label}: predicted tensor peak {predicted / MIB:,.1f} MiB, measured {measured.bytes / MIB:,.1f} MiB "
        f"({measured.what}): {error:+.1f}%", highlight=False,
    )
    if result.device_type == "cuda":
        process = result.value("nvml_process_peak_mib")
        if process is not None:
            held = process * MIB <= budget
            console.print(
                f"  NVML process peak {process:,.0f} MiB (predicted {candidate.device_total / MIB:,.0f} MiB with overheads): "
                f"{'fits' if held else 'does NOT fit'} {format_gib(budget)}", highlight=False,
            )
    else:
        console.print("  [dim]a CPU run checks the tensor peak only: whether it fits a GPU needs a CUDA run[/]", highlight=False)
    if outcome.interrupted:
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.command(help=ESTIMATE_HELP)(estimate)
    app.command(help=FIT_HELP)(fit)


