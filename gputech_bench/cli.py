"""The ``gputech-bench`` command line."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .config import (
    BenchConfig,
    ConfigError,
    apply_overrides,
    default_preset_name,
    describe_fields,
    load_preset,
    preset_names,
    read_preset,
)

SEED_MATRIX = ("baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Which memory-saving strategy makes your fine-tune fit, what it saves, what it costs, and whether accuracy holds.",
)
console = Console()
errors = Console(stderr=True)


def fail(message: str) -> None:
    """One line naming the problem and the fix, exit status 2, no traceback."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def cuda_available() -> bool:
    # Ask NVML rather than creating a CUDA context: the runner must leave the GPU untouched.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


def resolve_config(
    preset: Optional[str],
    sets: List[str],
    model: Optional[str],
    train_file: Optional[Path],
    eval_file: Optional[Path],
    device: str,
) -> BenchConfig:
    if device == "cuda" and not cuda_available():
        raise ConfigError(
            "--device cuda was given but torch.cuda.is_available() is False: use --device cpu, "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    name = preset or default_preset_name(cuda_available())
    if preset is None:
        why = "a CUDA device is available" if name == "seed" else "no CUDA device was found; --preset seed runs the seed's full setup"
        console.print(f"preset [bold]{name}[/] ({why})", highlight=False)
    config = load_preset(name)
    overrides = [f"device={device}"]
    if model:
        overrides.append(f"model.pretrained={model}")
    for option, path in (("--train-file", train_file), ("--eval-file", eval_file)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{option} '{path}' is not a file: pass a text file with one sentence per line")
    if train_file:
        # A user's file is used whole unless --set data.train_sentences=N says otherwise.
        overrides += [f"data.train_file={train_file.resolve()}", "data.train_sentences=0"]
    if eval_file:
        overrides.append(f"data.eval_file={eval_file.resolve()}")
    return apply_overrides(config, overrides + list(sets))


def parse_strategies(text: Optional[str], matrix: bool) -> list[str]:
    from .strategies import parse_cell, refusal_reason

    if matrix or not text:
        requested = list(SEED_MATRIX)
    else:
        requested = ["baseline"] + [part.strip() for part in text.split(",")]
    cells: list[str] = []
    for item in requested:
        cell = parse_cell(item)
        reason = refusal_reason(cell)
        if reason:
            raise ConfigError(f"refused combination: {reason}")
        if cell.name not in cells:
            cells.append(cell.name)
    return cells


def _metric(result: dict[str, Any], name: str) -> Any:
    return result.get("metrics", {}).get(name, {}).get("value")


def render_summary(results: list[dict[str, Any]]) -> Table:
    on_cuda = any(r.get("device", {}).get("type") == "cuda" for r in results)
    memory_metric = "nvml_process_peak_mib" if on_cuda else "tracked_peak_mib"
    table = Table(title="gputech-bench", title_justify="left")
    table.add_column("cell")
    table.add_column("GPU memory (NVML) MiB" if on_cuda else "tensor peak MiB", justify="right")
    table.add_column("time/epoch s", justify="right")
    table.add_column("masked acc", justify="right")
    table.add_column("token acc (seed)", justify="right")
    table.add_column("status")
    for result in results:
        if result["status"] != "ok":
            table.add_row(result["cell"], "-", "-", "-", "-", f"[red]{result['status']}[/]: {result.get('reason') or ''}")
            continue
        memory = _metric(result, memory_metric)
        seconds = _metric(result, "epoch_seconds")
        masked, token = _metric(result, "eval_masked_accuracy"), _metric(result, "eval_token_accuracy")
        table.add_row(
            result["cell"],
            "-" if memory is None else f"{memory:,.1f}",
            "-" if seconds is None else f"{seconds:,.2f}",
            "-" if masked is None else f"{100 * masked:.1f}%",
            "-" if token is None else f"{100 * token:.1f}%",
            "ok",
        )
    return table


RUN_EXAMPLES = """
**Examples**

* `gputech-bench run --matrix` - the seed's 8 cells on this machine's default preset
* `gputech-bench run --strategies 1,3,1+2+3 --set train.max_steps=40` - chosen cells, short
* `gputech-bench run --matrix --preset seed --device cuda` - the seed's exact setup on a GPU
"""


@app.command(help="Run strategy cells, one isolated process each, and print the comparison." + RUN_EXAMPLES)
def run(
    matrix: bool = typer.Option(False, "--matrix", help="Run the seed's 8 cells: baseline, 1, 2, 3, 4, 1+2+3, 1+2+4, lora."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated cells (numbers or names), e.g. '1,3,1+2+3'; the baseline is always added."),
    preset: Optional[str] = typer.Option(None, help="Preset name (see `gputech-bench presets`); default: seed with CUDA, cpu without."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting, e.g. --set train.epochs=1 (repeatable)."),
    model: Optional[str] = typer.Option(None, help="Local Hugging Face folder (or hub id) of a BertForMaskedLM."),
    train_file: Optional[Path] = typer.Option(None, help="Training text, one sentence per line."),
    eval_file: Optional[Path] = typer.Option(None, help="Eval text, one sentence per line."),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    results: Path = typer.Option(Path("results"), help="Folder that receives one sub-folder per run."),
    run_name: Optional[str] = typer.Option(None, help="Sub-folder name; default: preset and a timestamp."),
) -> None:
    from .runner import RunLayout, run_worker, write_run_config

    try:
        config = resolve_config(preset, set_, model, train_file, eval_file, device)
        cells = parse_strategies(strategies, matrix)
    except ValueError as error:
        fail(str(error))
    name = run_name or f"{config.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    layout = RunLayout(results / name)
    try:
        write_run_config(layout, config)
    except OSError as error:
        fail(f"cannot write to results folder '{layout.root}' ({error.strerror or error}): pass a writable --results DIR")
    console.print(f"run [bold]{name}[/]: {len(cells)} cell(s) -> {layout.root}", highlight=False)

    finished: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )
    with progress:
        overall = progress.add_task("cells", total=len(cells))
        steps = progress.add_task("", total=None)

        def on_event(cell: str, event: dict[str, Any]) -> None:
            if event["event"] == "phase":
                progress.update(steps, description=f"{cell}: {event['phase']}")
            elif event["event"] == "step":
                progress.update(steps, description=f"{cell}: train", completed=event["step"], total=event["total"])

        for index, cell in enumerate(cells):
            progress.reset(steps, total=None, description=f"{cell}: starting")
            progress.update(overall, description=f"cell {index + 1}/{len(cells)}")
            finished.append(run_worker(cell, layout, on_event))
            progress.advance(overall)

    console.print(render_summary(finished))
    for result in finished:
        for note in result.get("notes", []):
            console.print(f"  [dim]{result['cell']}:[/] {note}", highlight=False)
    console.print(f"results: {layout.root}", highlight=False)
    if any(result["status"] != "ok" for result in finished):
        raise typer.Exit(1)


@app.command("strategies", help="List every strategy: its number, name, what it saves and what it costs.")
def list_strategies() -> None:
    from .strategies import registered

    table = Table(title="strategies (combine with '+', e.g. 1+2+3)", title_justify="left")
    for column in ("key", "name", "saves", "costs"):
        table.add_column(column, overflow="fold")
    for cls in registered():
        table.add_row(cls.key, cls.name, cls.saves, cls.costs)
    console.print(table)


@app.command("presets", help="List the presets and the settings each changes from the seed's defaults.")
def list_presets() -> None:
    defaults = {key: default for key, default, _ in describe_fields()}
    for name in preset_names():
        try:
            config = load_preset(name)
            description = read_preset(name).get("description", "")
        except ConfigError as error:
            fail(str(error))
        console.print(f"[bold]{name}[/]: {description}", highlight=False)
        for key, default in defaults.items():
            section, field_name = key.split(".")
            value = getattr(getattr(config, section), field_name)
            if value != default:
                console.print(f"    {key} = {value!r}  (seed: {default!r})", highlight=False)


def version_callback(value: bool) -> None:
    if value:
        console.print(f"gputech-bench {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """Top-level options."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
