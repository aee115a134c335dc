"""``gputech-bench estimate`` and ``gputech-bench fit``; registered on the main app by cli.py."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import BenchConfig, from_dict
from ..errors import ConfigError, UserError, first_line
from ..results import CellResult, RunFolder
from ..units import MIB, parse_size
from .common import EXIT_FAILED_CELL, MORE_HINT, console, cuda_available, errors, fail, print_table, resolve_config

ESTIMATE_HELP = """Predict each cell's peak memory without a GPU: one training step traced on fake tensors.

The real model, strategies and training step run under PyTorch's FakeTensorMode, so
nothing is allocated; MemTracker counts parameters, gradients, optimizer state,
activations and temporaries. The CUDA context and the allocator's reserve are added as
labelled lines (calibrated from a measured run with --compare).

**Examples**

* `gputech-bench estimate --matrix --preset seed --device-memory 24GiB` - will the seed's cells fit a 24 GiB card?
* `gputech-bench estimate --strategies 1,1+2+3 --preset seed --set data.max_length=512`
* `gputech-bench estimate --compare results/seed-20261127-120000` - predicted against measured, error in %
* `gputech-bench estimate --model configs/models/llama-8b --preset seed --set data.objective=clm --set model.attention=sdpa --set train.batch_size=8 --set data.max_length=512 --strategies 1,4 --device-memory 24GiB` - an 8B Llama from its config.json alone
"""

FIT_HELP = """Find the fastest setup predicted to fit a memory budget.

Tries every strategy combination the registry allows, and micro-batch sizes 16x2, 8x4,
4x8 and 2x16 for accumulation, keeping the effective batch. Time comes from a measured
run (--from) or a labelled cost model. Strategies the tracer cannot follow (fsdp-offload,
qlora) are modelled around a trace of the rest of their cell, and labelled so. When every
fitting setup trains adapters only, the fastest one that trains every weight is named too.

**Examples**

* `gputech-bench fit --budget 24GiB --preset seed`
* `gputech-bench fit --budget 8GB --preset seed --from results/seed-20261127-120000` - times from a measured run
* `gputech-bench fit --budget 6GiB --preset cpu --verify` - and run the winner to check the prediction
* `gputech-bench fit --budget 24GiB --model configs/models/llama-8b --preset seed --set data.objective=clm --set model.attention=sdpa --set train.batch_size=8 --set data.max_length=512` - an 8B Llama on a 24 GiB card, from its config.json alone
"""


def _trace_progress(total: int) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )


def _predict(setups, config: BenchConfig, jobs: int):
    from ..estimate.predict import predict

    with _trace_progress(len(setups)) as progress:
        task = progress.add_task("tracing on fake tensors", total=len(setups))
        return predict(setups, config, jobs, on_done=lambda prediction: progress.advance(task))


def _tracer(predictor):
    """``fit``'s trace function: the predictor's pool, with a progress bar per batch of setups."""

    def trace(setups, config: BenchConfig, limit: Optional[int] = None):
        with _trace_progress(len(setups)) as progress:
            names = ", ".join(setup.label for setup in setups)
            task = progress.add_task(f"tracing {names}", total=len(setups))
            return predictor.predict(setups, config, on_done=lambda prediction: progress.advance(task), limit=limit)

    return trace


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


def _emit(text: str, output: Optional[Path]) -> None:
    """Markdown or JSON to the terminal as is, or atomically to ``output``."""
    if output is None:
        console.print(text, end="", highlight=False, soft_wrap=True, markup=False)
        return
    from ..files import atomic_write_bytes

    try:
        atomic_write_bytes(output, text.encode("utf-8"))
    except OSError as error:
        fail(f"cannot write {output} ({error.strerror or error}): pass a writable --output path")
    console.print(f"wrote {output}", highlight=False)


def build_estimate(
    config: BenchConfig, cells: list[str], jobs: int, budget: Optional[int], results: Optional[list[CellResult]]
):
    """Trace ``cells`` and assemble the report; shared by ``estimate`` and ``run``."""
    from ..estimate.measured import measured_peak
    from ..estimate.overheads import DEFAULTS, calibrate
    from ..estimate.predict import setups_for
    from ..estimate.render import EstimateReport
    from ..estimate.trace import modelled_attention_note, trace_target

    target = trace_target()
    predictions = _predict(setups_for(cells, config), config, jobs)
    overheads = calibrate(results) if results else DEFAULTS
    measured = {}
    if results is not None:
        by_cell = {result.cell: result for result in results}
        measured = {cell: measured_peak(by_cell.get(cell)) for cell in cells}
    caveat = "; ".join(note for note in (target.caveat, modelled_attention_note(config, target)) if note) or None
    return EstimateReport(target.label, caveat, predictions, overheads, budget, measured, config.data.objective,
                          config.model.attention)


def estimate_run(config: BenchConfig, results: list[CellResult], folder: RunFolder) -> None:
    """The predicted-against-measured table after ``run``. A failing estimate is a warning:
    the measured results are what the run is for."""
    from ..estimate.predict import default_jobs
    from ..estimate.render import write_estimate

    cells = [result.cell for result in results]
    try:
        # Starting a trace process costs an import of torch and transformers (~5 s): not for two cells.
        report = build_estimate(config, cells, default_jobs() if len(cells) > 2 else 1, None, results)
        write_estimate(folder, report)
    except Exception as error:  # noqa: BLE001 - never lose a finished run to its estimate
        errors.print(f"[yellow]warning:[/] no memory estimate ({type(error).__name__}: {first_line(error)}); "
                     f"'gputech-bench estimate --compare {folder.root}' retries it", highlight=False)
        return
    _print_against_measured(report)


def _print_against_measured(report) -> None:
    from ..estimate.render import compact_table, legend

    print_table(compact_table(report, title="predicted (fake-tensor trace) against measured, MiB"))
    for line in legend(report, with_overheads=False):
        console.print(f"  [dim]{line}[/]", highlight=False)
    console.print("  [dim]categories, CUDA context and allocator reserve: 'gputech-bench estimate --compare RUN_DIR'[/]", highlight=False)


def show_saved_estimate(loaded) -> None:
    """The run's saved estimate against its results, under ``report``'s table (if there is one)."""
    from ..estimate.measured import measured_peak
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
    preset: Optional[str] = typer.Option(None, help="Preset name; default: seed with CUDA, cpu without."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting, e.g. --set data.max_length=512 (repeatable)."),
    model: Optional[str] = typer.Option(None, help="A model folder or hub id; only its config.json is read (no weights): the shape is built on fake tensors."),
    train_file: Optional[Path] = typer.Option(None, help="Training text, one sentence per line (sets the tokenizer)."),
    device_memory: Optional[str] = typer.Option(None, help="Memory to fit, e.g. 24GiB or 24GB; default: this GPU's, if any."),
    compare: Optional[Path] = typer.Option(None, help="A run folder: use its config, and show predicted against measured."),
    jobs: int = typer.Option(0, min=0, help="Processes tracing in parallel; 0 = one per core, up to 4."),
    format_: str = typer.Option("table", "--format", help="table, md or json."),
    output: Optional[Path] = typer.Option(None, help="Write to this file instead of the terminal."),
) -> None:
    from ..estimate.predict import default_jobs
    from ..estimate.render import legend, markdown, rich_table, to_json
    from ..run.matrix import expand

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
        errors.print(f"[bold red]error:[/] the trace failed ({type(error).__name__}: {first_line(error)})", highlight=False)
        raise typer.Exit(EXIT_FAILED_CELL)
    if format_ == "json":
        _emit(to_json(report), output)
    elif format_ == "md" or output is not None:
        _emit(markdown(report), output)
    else:
        print_table(rich_table(report, title=f"gputech-bench estimate: preset {config.preset} (MiB)"), hint=MORE_HINT)
        for line in legend(report):
            console.print(f"  [dim]{line}[/]", highlight=False)
    if any(prediction.error for prediction in report.predictions):
        raise typer.Exit(EXIT_FAILED_CELL)


#: Faster setups that did not fit, named under the table; an LLM can have dozens.
REJECTED_SHOWN = 8


def _gib(num: int) -> str:
    return f"{num / 2**30:.2f}"


def _figure_notes(result) -> dict[str, int]:
    """Each distinct modelling method among the shown candidates, numbered for footnotes."""
    notes: dict[str, int] = {}
    shown = [*result.chosen, *([result.full_training] if result.full_training else []),
             *([result.floor] if result.floor else [])]
    for candidate in shown:
        method = candidate.prediction.modelled
        if method and method not in notes:
            notes[method] = len(notes) + 1
    return notes


def _figure(candidate, notes: dict[str, int]) -> str:
    method = candidate.prediction.modelled
    return f"modelled [{notes[method]}]" if method in notes else ("modelled" if method else "traced")


def _time_text(candidate) -> str:
    time = candidate.time
    return f"{time.seconds:,.0f} s/epoch" if time.seconds is not None else f"{time.factor:.2f}x baseline"


def _host_text(candidate) -> str:
    host = candidate.prediction.host
    return "-" if host is None else _gib(host.total_bytes)


def _device_text(candidate) -> str:
    return (">" if candidate.at_least else "") + _gib(candidate.device_total)


def _print_fit(result, config: BenchConfig) -> None:
    from rich.table import Table

    from ..estimate.fit import gives_up

    notes = _figure_notes(result)
    if result.floor is not None:
        for candidate in result.untraceable:
            console.print(f"  [yellow]not traced[/] {candidate.setup.label}: {candidate.prediction.error}", highlight=False)
        floor = result.floor
        console.print(
            f"[bold red]nothing fits {result.budget / 2**30:.1f} GiB[/]: the most frugal setup, "
            f"{floor.setup.label}, needs {'more than ' if floor.at_least else ''}{_gib(floor.device_total)} GiB "
            f"({_figure(floor, notes)})", highlight=False,
        )
        for line in result.suggestions:
            console.print(f"  would fit: {line}", highlight=False)
        for method, number in notes.items():
            console.print(f"  [dim][{number}] {method}[/]", highlight=False)
        return
    table = Table(title=f"setups that fit {result.budget / 2**30:.1f} GiB, fastest first", title_justify="left")
    for header in ("", "setup", "device GiB", "host GiB", "figure", "time", "time from", "gives up"):
        # 'time from' and 'gives up' are prose: a narrow terminal folds them, never a figure or a name.
        table.add_column(header, justify="right" if "GiB" in header or header == "time" else "left",
                         overflow="fold" if header in ("time from", "gives up") else "ellipsis",
                         no_wrap=header in ("setup", "figure"))
    rows = [("best" if rank == 1 else f"#{rank}", candidate) for rank, candidate in enumerate(result.chosen, start=1)]
    if result.full_training is not None:
        rows.append(("full", result.full_training))
    for rank, candidate in rows:
        table.add_row(rank, candidate.setup.label, _gib(candidate.device_total), _host_text(candidate),
                      _figure(candidate, notes), _time_text(candidate), candidate.time.source, gives_up(candidate.setup))
    print_table(table)
    if result.full_training is not None:
        console.print("  full: the fastest setup that trains every weight (the ones above train adapters only)",
                      highlight=False)
    elif result.no_full_training_fits:
        console.print(f"  [yellow]no setup that trains every weight fits {result.budget / 2**30:.1f} GiB[/] "
                      "(the ones above train adapters only)", highlight=False)
    for candidate in result.untraceable:
        console.print(f"  [yellow]not traced[/] {candidate.setup.label}: {candidate.prediction.error}", highlight=False)
    if result.rejected:
        shown = result.rejected[:REJECTED_SHOWN]
        too_big = ", ".join(f"{c.setup.label} ({_device_text(c)} GiB)" for c in shown)
        more = len(result.rejected) - len(shown)
        console.print(f"  [dim]faster but too big: {too_big}{f', and {more} more (--format json lists them)' if more else ''}[/]",
                      highlight=False)
        if any(c.at_least for c in result.rejected):
            console.print("  [dim]>: the trace stopped once the device passed the budget (the figure is what was live then), "
                          "or was not run: the same weights as a setup whose weights alone passed it[/]", highlight=False)
    for method, number in notes.items():
        console.print(f"  [dim][{number}] {method}[/]", highlight=False)
    console.print(
        f"  [dim]device GiB = tensor peak + allocator reserve + CUDA context; host GiB = tensors kept in host memory; "
        f"{result.untraced} slower candidate(s) not traced; objective {config.data.objective}, "
        f"attention {config.model.attention}, batch {config.train.batch_size} x {config.data.max_length} tokens[/]",
        highlight=False,
    )


def _fit_json(result, config: BenchConfig, overheads) -> str:
    """The search's result as JSON: every figure with how it came about (traced or modelled)."""
    import json

    from ..estimate.fit import gives_up, trains_every_weight

    def candidate(c) -> dict[str, Any]:
        return {
            "setup": c.setup.label,
            "cell": c.setup.cell,
            "micro_batch_size": c.setup.micro_batch_size,
            "fits": c.fits,
            "device_total_bytes": c.device_total,
            "device_total_is_lower_bound": c.at_least,
            "trains_every_weight": trains_every_weight(c.setup),
            "time_factor": c.time.factor,
            "time_seconds_per_epoch": c.time.seconds,
            "time_from": c.time.source,
            "gives_up": gives_up(c.setup),
            "prediction": c.prediction.to_dict(),
        }

    data = {
        "schema": "gputech-bench/fit/1",
        "budget_bytes": result.budget,
        "model": config.model.pretrained or "(model.* fields)",
        "batch_size": config.train.batch_size,
        "max_length": config.data.max_length,
        "objective": config.data.objective,
        "attention": config.model.attention,
        "overheads": {"cuda_context_bytes": overheads.context_bytes, "cuda_context_source": overheads.context_source,
                      "allocator_reserve_fraction": overheads.reserve_fraction,
                      "allocator_reserve_source": overheads.reserve_source},
        "chosen": [candidate(c) for c in result.chosen],
        "full_training": None if result.full_training is None else candidate(result.full_training),
        "no_full_training_fits": result.no_full_training_fits,
        "rejected": [candidate(c) for c in result.rejected],
        "untraceable": [candidate(c) for c in result.untraceable],
        "floor": None if result.floor is None else candidate(result.floor),
        "suggestions": result.suggestions,
        "untraced": result.untraced,
    }
    return json.dumps(data, indent=2, default=str) + "\n"


def fit(
    budget: str = typer.Option(..., help="Device memory to fit, e.g. 24GiB or 24GB (GB = 10^9 bytes, GiB = 2^30)."),
    preset: Optional[str] = typer.Option(None, help="Preset name; default: seed with CUDA, cpu without."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting (repeatable)."),
    model: Optional[str] = typer.Option(None, help="A model folder or hub id; only its config.json is read (no weights): the shape is built on fake tensors."),
    from_: Optional[Path] = typer.Option(None, "--from", help="A measured run folder: its times and overheads, and its config."),
    exclude: List[str] = typer.Option([], help="Leave a strategy out of the search, e.g. --exclude lora (repeatable)."),
    top: int = typer.Option(3, min=1, help="How many fitting setups to list."),
    verify: bool = typer.Option(False, "--verify", help="Run the best setup as a real cell and check the prediction."),
    results_dir: Path = typer.Option(Path("results"), "--results", help="Where --verify writes its run."),
    jobs: int = typer.Option(0, min=0, help="Processes tracing in parallel; 0 = one per core, up to 4."),
    format_: str = typer.Option("table", "--format", help="table or json."),
    output: Optional[Path] = typer.Option(None, help="With --format json: write to this file instead of the terminal."),
) -> None:
    from ..errors import StrategyError
    from ..estimate.fit import modelled_strategies, search, unsearchable
    from ..estimate.overheads import DEFAULTS, calibrate
    from ..estimate.predict import Predictor, default_jobs
    from ..estimate.trace import trace_target
    from ..strategies.registry import lookup

    if format_ not in ("table", "json"):
        fail(f"unknown --format '{format_}': choose table or json")
    if output is not None and format_ != "json":
        fail("--output writes the JSON result: add --format json")
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
        errors.print(
            f"[dim]not searched (the estimate cannot trace them here; measure them with 'run'): {', '.join(left_out)}[/]",
            highlight=False,
        )
    modelled = [key for key in modelled_strategies(device_type) if key not in excluded]
    if modelled:
        errors.print(
            f"[dim]modelled around a trace, not traced (their figures say so): {', '.join(modelled)}[/]", highlight=False,
        )
    try:
        with Predictor(workers) as predictor:
            result = search(
                config, budget_bytes, overheads, _tracer(predictor),
                measured, config.strategy.micro_batch_size, top, excluded, parallel=workers, device_type=device_type,
            )
    except UserError as error:
        fail(str(error))
    if format_ == "json":
        _emit(_fit_json(result, config, overheads), output)
    else:
        _print_fit(result, config)
    if result.floor is not None:
        raise typer.Exit(EXIT_FAILED_CELL)
    if verify:
        _verify(result.chosen[0], config, results_dir, budget_bytes)


def _verify(candidate, config: BenchConfig, results_dir: Path, budget: int) -> None:
    """Run the chosen setup as a real cell and put its measurement next to the prediction."""
    from ..estimate.measured import error_percent, measured_peak
    from ..run.runner import prepare_run_dir, run_matrix

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
                f"{'fits' if held else 'does NOT fit'} {budget / 2**30:.1f} GiB", highlight=False,
            )
    else:
        console.print("  [dim]a CPU run checks the tensor peak only: whether it fits a GPU needs a CUDA run[/]", highlight=False)
    if outcome.interrupted:
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.command(help=ESTIMATE_HELP)(estimate)
    app.command(help=FIT_HELP)(fit)


