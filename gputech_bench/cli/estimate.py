"""``gputech-bench estimate`` and ``gputech-bench fit``; registered on the main app by cli/__init__.py."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..api import estimate as estimate_memory
from ..api import fit as fit_budget
from ..config import model_overrides
from ..errors import UserError, error_line
from ..units import MIB, format_gib, format_size
from .common import (
    EXIT_FAILED_CELL,
    EXIT_INTERRUPTED,
    MODEL_OPTION,
    MORE_HINT,
    PRESET_OPTION,
    SET_OPTION,
    TRAIN_FILE_OPTION,
    console,
    emit,
    errors,
    fail,
    output,
    print_table,
)
from .tables import compact_estimate_table, estimate_table

ESTIMATE_HELP = """Predict each cell's peak memory without a GPU, and what nvidia-smi will show.

The real model, strategies and training steps run under PyTorch's FakeTensorMode, so
nothing is allocated; MemTracker counts parameters, gradients, optimizer state,
activations and temporaries. The traced allocations and frees are replayed through a
model of PyTorch's caching allocator (under PYTORCH_CUDA_ALLOC_CONF, or the settings of
the run given with --compare): its reserve, and the CUDA context, are added as labelled
lines, with a range where one cached segment may or may not be needed.

**Examples**

* `gputech-bench estimate --matrix --preset seed --device-memory 24GiB` - will the seed's cells fit a 24 GiB card?
* `gputech-bench estimate --strategies 1,1+2+3 --preset seed --set data.max_length=512`
* `gputech-bench estimate --compare results/seed-20261127-120000` - predicted against measured, error in %
* `gputech-bench estimate --strategies fsdp --nproc-per-node 8 --preset seed` - per rank of 8: fsdp's shards and DDP's replicas
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
* `gputech-bench fit --budget 24GiB --preset seed --format json --output fit.json` - every candidate weighed, as JSON
* `gputech-bench fit --budget 80GiB --nproc-per-node 8 --model configs/models/llama-70b --preset seed --set data.objective=clm --set model.attention=sdpa` - a 70B Llama on 8 GPUs of 80 GiB, per rank: fsdp, DDP and fsdp-offload weighed
"""


NPROC_HELP = ("Ranks per node each cell would run on (as for 'run'): with more than one, each cell is traced as "
              "rank 0 in a fake process group, per rank: fsdp sharded, the others replicated (DDP).")
NNODES_HELP = "Nodes each cell would run on (as for 'run'); the world size is --nproc-per-node x --nnodes."


def print_against_measured(report) -> None:
    """The predicted-against-measured table under ``run``'s and ``report``'s."""
    from ..estimator.render import legend

    print_table(compact_estimate_table(report, title="predicted (fake-tensor trace) against measured, MiB"))
    for line in legend(report, with_overheads=False):
        console.print(f"  [dim]{line}[/]", highlight=False)
    console.print("  [dim]categories, CUDA context and allocator reserve: 'gputech-bench estimate --compare RUN_DIR'[/]", highlight=False)


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
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help=NPROC_HELP),
    nnodes: int = typer.Option(1, "--nnodes", help=NNODES_HELP),
    format_: str = typer.Option("table", "--format", help="table, md or json."),
    output_path: Optional[Path] = typer.Option(None, "--output", help="Write to this file instead of the terminal."),
) -> None:

    if format_ not in ("table", "md", "json"):
        fail(f"unknown --format '{format_}': choose table, md or json")
    try:
        found = estimate_memory(
            strategies, matrix=matrix, preset=preset, overrides=set_, model=model, train_file=train_file,
            device_memory=device_memory, compare=compare, jobs=jobs, nproc_per_node=nproc_per_node, nnodes=nnodes,
            output=output(stdout_is_data=format_ != "table" and output_path is None),
        )
    except UserError as error:
        fail(str(error))
    except Exception as error:  # a model or strategy the tracer cannot follow
        errors.print(f"[bold red]error:[/] the trace failed ({error_line(error)})", highlight=False)
        raise typer.Exit(EXIT_FAILED_CELL) from None
    if format_ == "json":
        emit(found.to_json(), output_path)
    elif format_ == "md" or output_path is not None:
        emit(found.markdown(), output_path)
    else:
        per_rank = f", {found.report.per_rank}" if found.report.per_rank else ""
        print_table(estimate_table(found.report,
                                   title=f"gputech-bench estimate: preset {found.config.preset} (MiB{per_rank})"),
                    hint=MORE_HINT)
        for line in found.legend():
            console.print(f"  [dim]{line}[/]", highlight=False)
    if found.failed:
        raise typer.Exit(EXIT_FAILED_CELL)




def _figure_notes(result) -> dict[str, int]:
    """Each distinct modelling method among the shown candidates, numbered for footnotes."""
    from ..estimator.render import numbered_methods

    shown = [*result.chosen, *([result.full_training] if result.full_training else []),
             *([result.floor] if result.floor else []), *result.rejected]
    return numbered_methods(candidate.prediction for candidate in shown)


def _figure(candidate, notes: dict[str, int]) -> str:
    from ..estimator.render import method_word

    method = candidate.prediction.modelled
    return f"{method_word(method)} [{notes[method]}]" if method in notes else method_word(method)


def _time_text(candidate) -> str:
    time = candidate.time
    return f"{time.seconds:,.0f} s/epoch" if time.seconds is not None else f"{time.factor:.2f}x baseline"


def _host_text(candidate) -> str:
    host = candidate.prediction.host
    return "-" if host is None else format_size(host.total_bytes)


def _device_text(candidate) -> str:
    """'>' marks a lower bound: the trace stopped once past the budget. A range where one
    allocator segment may or may not be needed; the budget is judged against its upper end."""
    low = candidate.device_total_low
    if low is not None and not candidate.at_least and format_size(low) != format_size(candidate.device_total):
        return f"{format_size(low)}-{format_size(candidate.device_total)}"
    return (">" if candidate.at_least else "") + format_size(candidate.device_total)


def _print_fit(found) -> None:
    from ..estimator.fit import gives_up

    result, config = found.result, found.config
    notes = _figure_notes(result)
    if result.floor is not None:
        for candidate in result.untraceable:
            console.print(f"  [yellow]not traced[/] {candidate.setup.label}: {candidate.prediction.error}", highlight=False)
        floor = result.floor
        console.print(
            f"[bold red]nothing fits {format_gib(result.budget)}{' per rank' if found.world_size > 1 else ''}[/]: "
            f"the most frugal setup, "
            f"{floor.setup.label}, needs {'more than ' if floor.at_least else ''}{format_size(floor.device_total)} "
            f"({_figure(floor, notes)})", highlight=False,
        )
        for line in result.suggestions:
            console.print(f"  would fit: {line}", highlight=False)
        for method, number in notes.items():
            console.print(f"  [dim][{number}] {method}[/]", highlight=False)
        return
    per_rank = f" per rank of {found.world_size}" if found.world_size > 1 else ""
    table = Table(title=f"setups that fit {format_gib(result.budget)}{per_rank}, fastest first", title_justify="left")
    for header in ("", "setup", "device", "host", "figure", "time", "time from", "gives up"):
        # 'time from' and 'gives up' are prose: a narrow terminal folds them, never a figure or a name.
        table.add_column(header, justify="right" if header in ("device", "host", "time") else "left",
                         overflow="fold" if header in ("time from", "gives up") else "ellipsis",
                         no_wrap=header in ("setup", "device", "host", "figure"))  # a size keeps its unit
    rows = [("best" if rank == 1 else f"#{rank}", candidate) for rank, candidate in enumerate(result.chosen, start=1)]
    if result.full_training is not None:
        rows.append(("full", result.full_training))
    for rank, candidate in rows:
        table.add_row(rank, candidate.setup.label, _device_text(candidate), _host_text(candidate),
                      _figure(candidate, notes), _time_text(candidate), candidate.time.source, gives_up(candidate.setup))
    print_table(table)
    if result.full_training is not None:
        console.print("  full: the fastest setup that trains every weight (the ones above train adapters only)",
                      highlight=False)
    elif result.no_full_training_fits:
        console.print(f"  [yellow]no setup that trains every weight fits {format_gib(result.budget)}[/] "
                      "(the ones above train adapters only)", highlight=False)
    for candidate in result.untraceable:
        console.print(f"  [yellow]not traced[/] {candidate.setup.label}: {candidate.prediction.error}", highlight=False)
    if result.rejected:
        too_big = ", ".join(f"{c.setup.label} ({_device_text(c)}, {_figure(c, notes)})" for c in result.rejected)
        console.print(f"  [dim]faster but too big: {too_big}[/]", highlight=False)
        if any(c.at_least for c in result.rejected):
            console.print("  [dim]>: the trace stopped once the device passed the budget (the figure is what was live then), "
                          "or was not run: the same weights and optimizer state as a setup whose weights and optimizer state alone passed it[/]", highlight=False)
    for method, number in notes.items():
        console.print(f"  [dim][{number}] {method}[/]", highlight=False)
    for _rank, candidate in rows:
        why = candidate.prediction.reserved.why if candidate.prediction.reserved is not None else None
        if why:
            console.print(f"  {candidate.setup.label}: {why}; judged against the upper end", highlight=False)
    overridden = "".join(f"; {text}" for text in model_overrides(config.model))
    console.print(
        f"  [dim]device = what nvidia-smi will show: tensor peak + the caching allocator's reserve (replayed from the "
        f"traced allocations; a range where one segment may or may not be needed, judged against its upper end) + "
        f"CUDA context; host = tensors kept in host memory; "
        f"{result.untraced} slower candidate(s) not traced; objective {config.data.objective}, "
        f"attention {config.model.attention}{overridden}[/]", highlight=False,
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
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help=NPROC_HELP),
    nnodes: int = typer.Option(1, "--nnodes", help=NNODES_HELP),
    format_: str = typer.Option("table", "--format", help="table or json (every candidate weighed, with how each figure came about)."),
    output_path: Optional[Path] = typer.Option(None, "--output", help="With --format json: write to this file instead of the terminal."),
) -> None:
    if format_ not in ("table", "json"):
        fail(f"unknown --format '{format_}': choose table or json")
    if output_path is not None and format_ != "json":
        fail("--output writes the JSON result: add --format json")
    try:
        found = fit_budget(budget, preset=preset, overrides=set_, model=model, from_run=from_, exclude=exclude, top=top,
                           verify=verify, results=results_dir, jobs=jobs, nproc_per_node=nproc_per_node, nnodes=nnodes,
                           output=output(stdout_is_data=format_ == "json" and output_path is None))
    except UserError as error:
        fail(str(error))
    if format_ == "json":
        emit(found.to_json(), output_path)
    else:
        _print_fit(found)
    if not found.fits:
        raise typer.Exit(EXIT_FAILED_CELL)
    if found.verification is not None:
        _print_verification(found.verification, found.budget_bytes)


def _print_verification(verified, budget: int) -> None:
    """The best setup, run as a real cell (``fit --verify``), beside its prediction."""
    setup, result, measured = verified.setup, verified.result, verified.measured
    if measured.bytes is None:
        console.print(f"  {setup.label}: {result.status} - nothing to compare ({measured.what}); {result.reason or ''}", highlight=False)
        raise typer.Exit(EXIT_FAILED_CELL)
    console.print(
        f"  {setup.label}: predicted tensor peak {verified.predicted_bytes / MIB:,.1f} MiB, measured "
        f"{measured.bytes / MIB:,.1f} MiB ({measured.what}): {verified.error_percent:+.1f}%", highlight=False,
    )
    if result.device_type == "cuda":
        if verified.nvml_process_mib is not None:
            console.print(
                f"  NVML process peak {verified.nvml_process_mib:,.0f} MiB (predicted "
                f"{verified.predicted_total_bytes / MIB:,.0f} MiB with overheads): "
                f"{'fits' if verified.fits_budget else 'does NOT fit'} {format_gib(budget)}", highlight=False,
            )
    else:
        console.print("  [dim]a CPU run checks the tensor peak only: whether it fits a GPU needs a CUDA run[/]", highlight=False)
    if verified.run.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def register(app: typer.Typer) -> None:
    app.command(help=ESTIMATE_HELP)(estimate)
    app.command(help=FIT_HELP)(fit)


