"""``gputech-bench estimate`` and ``gputech-bench fit``; registered on the main app by cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError, first_line
from ..units import MIB
from .common import EXIT_FAILED_CELL, EXIT_INTERRUPTED, MORE_HINT, console, errors, fail, output, print_table

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


def print_against_measured(report) -> None:
    """The predicted-against-measured table under ``run``'s and ``report``'s."""
    from ..estimate.render import compact_table, legend

    print_table(compact_table(report, title="predicted (fake-tensor trace) against measured, MiB"))
    for line in legend(report, with_overheads=False):
        console.print(f"  [dim]{line}[/]", highlight=False)
    console.print("  [dim]categories, CUDA context and allocator reserve: 'gputech-bench estimate --compare RUN_DIR'[/]", highlight=False)


def estimate(
    matrix: bool = typer.Option(False, "--matrix", help="The seed's 8 cells."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated cells, as for 'run'; the baseline is always added."),
    preset: Optional[str] = typer.Option(None, help="Preset name; default: seed with CUDA, cpu without."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting, e.g. --set data.max_length=512 (repeatable)."),
    model: Optional[str] = typer.Option(None, help="Local Hugging Face folder of a BertForMaskedLM (only its config.json is read)."),
    train_file: Optional[Path] = typer.Option(None, help="Training text, one sentence per line (sets the tokenizer)."),
    device_memory: Optional[str] = typer.Option(None, help="Memory to fit, e.g. 24GiB or 24GB; default: this GPU's, if any."),
    compare: Optional[Path] = typer.Option(None, help="A run folder: use its config, and show predicted against measured."),
    jobs: int = typer.Option(0, min=0, help="Processes tracing in parallel; 0 = one per core, up to 4."),
    format_: str = typer.Option("table", "--format", help="table, md or json."),
    output_path: Optional[Path] = typer.Option(None, "--output", help="Write to this file instead of the terminal."),
) -> None:
    from ..api import estimate as estimate_memory

    if format_ not in ("table", "md", "json"):
        fail(f"unknown --format '{format_}': choose table, md or json")
    try:
        found = estimate_memory(
            strategies, matrix=matrix, preset=preset, overrides=set_, model=model, train_file=train_file,
            device_memory=device_memory, compare=compare, jobs=jobs, output=output(),
        )
    except UserError as error:
        fail(str(error))
    except Exception as error:  # a model or strategy the tracer cannot follow
        errors.print(f"[bold red]error:[/] the trace failed ({type(error).__name__}: {first_line(error)})", highlight=False)
        raise typer.Exit(EXIT_FAILED_CELL)
    if format_ == "json":
        _emit(found.to_json(), output_path)
    elif format_ == "md" or output_path is not None:
        _emit(found.markdown(), output_path)
    else:
        print_table(found.table(), hint=MORE_HINT)
        for line in found.legend():
            console.print(f"  [dim]{line}[/]", highlight=False)
    if found.failed:
        raise typer.Exit(EXIT_FAILED_CELL)


def _print_fit(found) -> None:
    from rich.table import Table

    for part in found.renderables():
        if isinstance(part, Table):
            print_table(part)
        else:
            console.print(part, highlight=False)


def fit(
    budget: str = typer.Option(..., help="Device memory to fit, e.g. 24GiB or 24GB (GB = 10^9 bytes, GiB = 2^30)."),
    preset: Optional[str] = typer.Option(None, help="Preset name; default: seed with CUDA, cpu without."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting (repeatable)."),
    model: Optional[str] = typer.Option(None, help="Local Hugging Face folder of a BertForMaskedLM (only its config.json is read)."),
    from_: Optional[Path] = typer.Option(None, "--from", help="A measured run folder: its times and overheads, and its config."),
    exclude: List[str] = typer.Option([], help="Leave a strategy out of the search, e.g. --exclude lora (repeatable)."),
    top: int = typer.Option(3, min=1, help="How many fitting setups to list."),
    verify: bool = typer.Option(False, "--verify", help="Run the best setup as a real cell and check the prediction."),
    results_dir: Path = typer.Option(Path("results"), "--results", help="Where --verify writes its run."),
    jobs: int = typer.Option(0, min=0, help="Processes tracing in parallel; 0 = one per core, up to 4."),
) -> None:
    from ..api import fit as fit_budget

    try:
        found = fit_budget(budget, preset=preset, overrides=set_, model=model, from_run=from_, exclude=exclude, top=top,
                           verify=verify, results=results_dir, jobs=jobs, output=output())
    except UserError as error:
        fail(str(error))
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
                f"{'fits' if verified.fits_budget else 'does NOT fit'} {budget / 2**30:.1f} GiB", highlight=False,
            )
    else:
        console.print("  [dim]a CPU run checks the tensor peak only: whether it fits a GPU needs a CUDA run[/]", highlight=False)
    if verified.run.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def register(app: typer.Typer) -> None:
    app.command(help=ESTIMATE_HELP)(estimate)
    app.command(help=FIT_HELP)(fit)


