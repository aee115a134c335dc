"""``gputech-bench run``: the matrix, one worker process per cell, then the table."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from ..errors import ConfigError, ResultError
from ..measure import gpu_busy
from ..results import CellResult, RunFolder
from ..run.forkserver import ForkServer
from ..run.launch import Launch, gpu_slots
from ..run.runner import fork_server_suits, prepare_run_dir, run_matrix
from .common import (
    EXIT_FAILED_CELL,
    EXIT_INTERRUPTED,
    MODEL_OPTION,
    MORE_HINT,
    PRESET_OPTION,
    SET_OPTION,
    TRAIN_FILE_OPTION,
    console,
    errors,
    fail,
    messages_to_stderr,
    print_table,
    resolve_config,
    uses_cuda,
)
from .estimate import estimate_run

#: What ``run --format`` prints at the end: report's formats but html, which is a file (``report --format html``).
RUN_FORMATS = ("table", "md", "csv", "json")


def check_gpu_idle(allow_busy: bool, gpus: Optional[str] = None) -> None:
    """Refuse to start on a busy GPU; ``gpus`` is --gpus, so that only the run's GPUs count."""
    check = gpu_busy.idle_check(gpus)
    if check.error:
        errors.print(f"[yellow]warning:[/] NVML failed ({check.error}), so the idle-GPU check was skipped", highlight=False, soft_wrap=True)
    for entry in check.unchecked:
        # A MIG instance, or a number past NVML's count: the worker will say more if it cannot start.
        errors.print(f"[yellow]warning:[/] NVML lists no GPU '{entry}', so the idle-GPU check skipped it", highlight=False, soft_wrap=True)
    busy = check.busy
    if not busy:
        return
    what = "; ".join(gpu.describe() for gpu in busy)
    if allow_busy:
        errors.print(f"[yellow]warning:[/] {what}: memory figures include other processes' usage", highlight=False, soft_wrap=True)
        return
    fail(f"{what}, so every memory figure would be off: stop those processes, or pass --allow-busy-gpu to run anyway")


class MatrixProgress:
    """Runs done out of N, and a step bar for each running cell (several with --gpus)."""

    def __init__(self, total: int) -> None:
        # Only the bar shrinks in a narrow terminal: a cell's name and the counts stay whole.
        whole = dict(table_column=Column(no_wrap=True))
        self.progress = Progress(
            TextColumn("[bold]{task.description}", **whole), BarColumn(), MofNCompleteColumn(**whole),
            TimeElapsedColumn(**whole), TimeRemainingColumn(**whole), console=console, transient=True,
        )
        self.overall = self.progress.add_task("cells", total=total)
        self.bars: dict[str, tuple[Any, str]] = {}  # label -> (its step bar, its title)
        self.labels: dict[int, str] = {}  # job index -> label

    def __enter__(self) -> "MatrixProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def cell_started(self, index: int, label: str, slot: Any = None) -> None:
        self.labels[index] = label
        title = f"  {label}" + (f" on GPU {','.join(slot)}" if slot else "")
        self.bars[label] = (self.progress.add_task(f"{title}: starting", total=None), title)

    def cell_finished(self, index: int, result: CellResult) -> None:
        self.progress.advance(self.overall)
        label = self.labels.pop(index, result.cell)
        bar = self.bars.pop(label, None)
        if bar is not None:
            self.progress.remove_task(bar[0])
        status = result.status
        mark = "[green]ok[/]" if status == "ok" else f"[bold red]{status}[/]: {escape(result.reason or '')}"
        console.print(f"  {escape(label)}: {mark}", highlight=False)

    def event(self, label: str, event: dict[str, Any]) -> None:
        if label not in self.bars:
            return
        task, title = self.bars[label]
        if event["event"] == "phase":
            self.progress.update(task, description=f"{title}: {event['phase']}")
        elif event["event"] == "step":
            self.progress.update(task, description=f"{title}: train", completed=event["step"], total=event["total"])


RUN_HELP = """Run strategy cells, one isolated process each, and print the comparison table.

Results go to RESULTS/RUN-NAME: one JSON per cell, the resolved config, report.md/.csv/.json
and a log per cell. Re-running with the same --run-name skips cells that are already ok.

**Examples**

* `gputech-bench run --matrix` - the seed's 8 cells on this machine's default preset
* `gputech-bench run --strategies 1,3,1+2+3 --set train.max_steps=40` - chosen cells (+ baseline), short
* `gputech-bench run --matrix --preset seed --device cuda --cell-timeout 1800` - the seed's exact setup on a GPU
* `gputech-bench run --matrix --preset seed-512 --gpu-memory-limit 24GiB` - which cells fit a 24 GiB card?
* `gputech-bench run --matrix --model ./my-bert --train-file train.txt --eval-file eval.txt`
* `gputech-bench run --strategies amp,amp+sparse-head,1+amp+sparse-head,fsdp-offload --set data.objective=mlm` - the modern strategies (sparse-head needs the mlm objective)
* `gputech-bench run --matrix --repeat 5` - medians, spread and outliers; differences within noise are marked
* `gputech-bench run --strategies 1,amp --repeat 3 --vary-seed` - accuracy's spread over seeds
* `gputech-bench run --matrix --gpus 0,1,2,3` - four cells at a time, one per GPU
* `gputech-bench run --strategies fsdp-offload --nproc-per-node 4` - each cell sharded over 4 GPUs (torchrun)
* `gputech-bench run --matrix --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500` - on node 0 of 2
"""


def run(
    ctx: typer.Context,
    matrix: bool = typer.Option(False, "--matrix", help="Run the seed's 8 cells: baseline, 1, 2, 3, 4, 1+2+3, 1+2+4, lora."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated cells, numbers or names (e.g. '1,3,1+2+3' or 'checkpointing+accumulation'); the baseline is always added."),
    preset: Optional[str] = PRESET_OPTION,
    set_: List[str] = SET_OPTION,
    model: Optional[str] = MODEL_OPTION,
    train_file: Optional[Path] = TRAIN_FILE_OPTION,
    eval_file: Optional[Path] = typer.Option(None, help="Eval text, one sentence per line."),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    results: Path = typer.Option(Path("results"), help="Folder that receives one sub-folder per run."),
    run_name: Optional[str] = typer.Option(None, help="Sub-folder name; default: the preset and a timestamp."),
    cell_timeout: Optional[float] = typer.Option(None, min=1, help="Seconds a cell may run before it is stopped and recorded as 'timeout'."),
    force: bool = typer.Option(False, "--force", help="Re-run every cell, even those already ok in this run."),
    allow_busy_gpu: bool = typer.Option(False, "--allow-busy-gpu", help="Run even when other processes hold GPU memory."),
    gpu_memory_limit: Optional[str] = typer.Option(None, help="Emulate a smaller card, e.g. 24GiB: cells past it become 'oom' rows."),
    memory_snapshot: bool = typer.Option(False, "--memory-snapshot", help="Write a CUDA memory snapshot per cell (open it in pytorch.org/memory_viz)."),
    estimate: bool = typer.Option(True, "--estimate/--no-estimate", help="After the cells, trace each one on fake tensors and show predicted against measured memory."),
    gpus: Optional[str] = typer.Option(None, help="Run cells at the same time, one per GPU, e.g. --gpus 0,1,2,3 (each pinned with CUDA_VISIBLE_DEVICES; under an inherited CUDA_VISIBLE_DEVICES, indices into that list)."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Ranks per cell through torchrun: data-parallel (DDP), or sharded with fsdp-offload. gloo on CPU."),
    nnodes: int = typer.Option(1, min=1, help="Nodes taking part in each cell (torchrun --nnodes); run the same command on every node."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank, 0 to nnodes-1 (torchrun --node-rank)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0, reachable from every node (torchrun --rdzv-endpoint)."),
    repeat: int = typer.Option(1, min=1, help="Run each cell N times, each in a fresh process; the table shows medians, and differences within the spread are marked as noise."),
    vary_seed: bool = typer.Option(False, "--vary-seed", help="With --repeat: train.seed + 0, 1, 2... (weights, batches, masks), to see accuracy's spread; without it the seed is fixed and the spread is timing noise alone."),
    format_: str = typer.Option("table", "--format", help="How the table at the end is printed: table, md, csv or json (md, csv and json go to stdout alone, everything else to stderr). report.md/.csv/.json are written either way."),
) -> None:
    if format_ not in RUN_FORMATS:
        fail(f"unknown --format '{format_}': choose one of {', '.join(RUN_FORMATS)} ('report RUN_DIR --format html' makes the HTML file)")
    if format_ != "table":
        ctx.call_on_close(messages_to_stderr())
    from ..run.matrix import expand

    extra = [f"gpu_memory_limit={gpu_memory_limit}"] if gpu_memory_limit else []
    extra += ["memory_snapshot=true"] if memory_snapshot else []
    try:
        config = resolve_config(preset, [*set_, *extra], model, train_file, eval_file, device)
        if (config.gpu_memory_limit or config.memory_snapshot) and not uses_cuda(config):
            raise ConfigError("--gpu-memory-limit and --memory-snapshot need a CUDA device: drop them on this machine")
        cells = expand(strategies, matrix, config, uses_cuda(config))
        launch = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
        launch.check()
        if gpus is not None and not uses_cuda(config):
            raise ConfigError("--gpus needs CUDA devices and this run has none: drop --gpus, or run on a GPU machine")
        slots = gpu_slots(gpus, nproc_per_node)
        if vary_seed and repeat < 2:
            raise ConfigError("--vary-seed needs --repeat 2 or more: each repeat takes the next seed")
    except ValueError as error:
        fail(str(error))
    seeds = [config.train.seed + (k if vary_seed else 0) for k in range(repeat)]
    if uses_cuda(config):
        check_gpu_idle(allow_busy_gpu, gpus)
    name = run_name or f"{config.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = RunFolder(results / name)
    try:
        prepare_run_dir(folder, config, force)
    except ConfigError as error:
        fail(str(error))
    console.print(f"run [bold]{name}[/]: {len(cells)} cell(s), preset {config.preset} -> {folder.root}", highlight=False)
    if launch.distributed:
        console.print(
            f"each cell: {launch.world_size} rank(s) via torchrun ({launch.nproc_per_node} per node x {launch.nnodes} node(s))",
            highlight=False,
        )
    if len(slots) > 1:
        console.print(f"{len(slots)} cells at a time: " + ", ".join(f"GPU {','.join(slot)}" for slot in slots), highlight=False)
    if repeat > 1:
        how = f"seeds {seeds[0]}..{seeds[-1]}" if vary_seed else f"seed {seeds[0]} each time: the spread is timing noise"
        console.print(f"each cell {repeat} times, in a fresh process each, round-robin ({how})", highlight=False)

    # CPU cells are forked from one preloaded server; a CUDA cell or a torchrun launch starts a
    # fresh interpreter. The server lives until the estimate, which forks its traces from it too.
    forks = ForkServer(folder.fork_server_log_path) if fork_server_suits(uses_cuda(config), launch) else None
    try:
        with MatrixProgress(len(cells) * repeat) as progress:
            outcome = run_matrix(
                cells, folder, force=force, cell_timeout=cell_timeout, on_event=progress.event,
                on_cell_start=progress.cell_started, on_cell_end=progress.cell_finished, launch=launch, slots=slots,
                repeats=repeat, seeds=seeds if repeat > 1 else None, forks=forks,
            )
        if forks is not None and forks.failure:
            errors.print(f"[yellow]note:[/] cells started as fresh interpreters: {escape(forks.failure)}", highlight=False)
        _report(outcome, folder, name, format_)
        if estimate and launch.distributed:
            console.print("[dim]no memory estimate: it traces one process with the whole batch, not a rank's share[/]", highlight=False)
        elif estimate and not outcome.interrupted:
            estimate_run(config, outcome.results, folder, forks)
    finally:
        if forks is not None:
            forks.close()

    if outcome.interrupted:
        done = {result.cell for result in outcome.results if result.ok}
        left = [cell for cell in cells if cell not in done]
        console.print(f"interrupted: re-run with --run-name {name} to finish {', '.join(left)}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if any(not result.ok for result in outcome.results):
        raise typer.Exit(EXIT_FAILED_CELL)


def _report(outcome, folder, name: str, format_: str) -> None:
    """The table (as --format asks), each cell's notes, the report files and the wall time."""
    from ..report.export import render, write_exports
    from ..report.frame import build_frame
    from .tables import results_table

    if outcome.reused:
        console.print(f"reused {len(outcome.reused)} finished cell(s): {', '.join(outcome.reused)} (--force re-runs them)", highlight=False)

    if format_ == "table":
        frame, measure = build_frame(outcome.results)
        print_table(results_table(frame, measure, title=f"gputech-bench: {name}"), hint=MORE_HINT)
    else:
        try:
            sys.stdout.write(render(folder.load(), format_))
            sys.stdout.flush()
        except (OSError, ResultError) as error:
            errors.print(f"[yellow]warning:[/] could not render the table as {format_} ({error}); the cell results are in {folder.root}")
    for result in outcome.results:
        for note in result.notes:
            console.print(f"  [dim]{result.cell}:[/] {note}", highlight=False)
    try:
        written = write_exports(folder.load())
        console.print(f"results: {folder.root} ({', '.join(path.name for path in written)})", highlight=False)
    except OSError as error:
        errors.print(f"[yellow]warning:[/] could not write the report files ({error}); the cell results are in {folder.root}")
    console.print(f"matrix wall time: {outcome.seconds:,.0f} s", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(help=RUN_HELP)(run)
