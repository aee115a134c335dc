"""``gputech-bench run``: the matrix, one worker process per cell, then the table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..api import run_matrix
from ..errors import ResultError
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
    output,
    print_table,
)
from .estimate import print_against_measured
from .tables import results_table

#: What ``run --format`` prints at the end: report's formats but html, which is a file (``report --format html``).
RUN_FORMATS = ("table", "md", "csv", "json")


RUN_HELP = """Run strategy cells, one isolated process each, and print the comparison table.

Results go to RESULTS/RUN-NAME: one JSON per cell, the resolved config, report.md/.csv/.json
and a log per cell. Re-running with the same --run-name skips cells that are already ok.
--shard K/N spreads one matrix over N machines that share the results folder.

**Examples**

* `gputech-bench run --matrix` - the seed's 8 cells on this machine's default preset
* `gputech-bench run --strategies 1,3,1+2+3 --set train.max_steps=40` - chosen cells (+ baseline), short
* `gputech-bench run --matrix --preset seed --device cuda --cell-timeout 1800` - the seed's exact setup on a GPU
* `gputech-bench run --matrix --preset seed-512 --gpu-memory-limit 24GiB` - which cells fit a 24 GiB card?
* `gputech-bench run --matrix --model ./my-bert --train-file train.txt --eval-file eval.txt`
* `gputech-bench run --strategies amp,amp+sparse-head,1+amp+sparse-head,fsdp-offload --set data.objective=mlm` - the modern strategies (sparse-head needs the mlm objective)
* `gputech-bench run --matrix --preset seed --allocator expandable` - the CUDA allocator with expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), so cached segments weigh less in reserved and NVML
* `gputech-bench run --matrix --repeat 5` - medians, spread and outliers; differences within noise are marked
* `gputech-bench run --strategies 1,amp --repeat 3 --vary-seed` - accuracy's spread over seeds
* `gputech-bench run --matrix --gpus 0,1,2,3` - four cells at a time, one per GPU
* `gputech-bench run --strategies fsdp-offload --nproc-per-node 4` - each cell sharded over 4 GPUs (torchrun)
* `gputech-bench run --matrix --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500` - on node 0 of 2
* `gputech-bench run --matrix --preset seed --results /shared/results --run-name big --shard 2/4` - the 2nd of 4 machines' slices of one matrix, into one folder on a shared filesystem (slurm: --shard ${SLURM_ARRAY_TASK_ID}/4); `gputech-bench report /shared/results/big` shows the merged table and what is missing
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
    allocator: str = typer.Option("default", "--allocator", help="The CUDA caching allocator's setting for every cell: 'default' leaves the inherited PYTORCH_CUDA_ALLOC_CONF alone; 'expandable' sets expandable_segments:True in it (other inherited options kept), e.g. --allocator expandable. Recorded in each result; no effect on CPU."),
    estimate: bool = typer.Option(True, "--estimate/--no-estimate", help="After the cells, trace each one on fake tensors and show predicted against measured memory."),
    gpus: Optional[str] = typer.Option(None, help="Run cells at the same time, one per GPU, e.g. --gpus 0,1,2,3 (each pinned with CUDA_VISIBLE_DEVICES; under an inherited CUDA_VISIBLE_DEVICES, indices into that list)."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Ranks per cell through torchrun: data-parallel (DDP), or sharded with fsdp-offload. gloo on CPU."),
    nnodes: int = typer.Option(1, min=1, help="Nodes taking part in each cell (torchrun --nnodes); run the same command on every node."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank, 0 to nnodes-1 (torchrun --node-rank)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0, reachable from every node (torchrun --rdzv-endpoint)."),
    repeat: int = typer.Option(1, min=1, help="Run each cell N times, each in a fresh process; the table shows medians, and differences within the spread are marked as noise."),
    vary_seed: bool = typer.Option(False, "--vary-seed", help="With --repeat: train.seed + 0, 1, 2... (weights, batches, masks), to see accuracy's spread; without it the seed is fixed and the spread is timing noise alone."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N", help="Run only the K-th (from 1) of N round-robin slices of the cells, e.g. --shard 2/4 on the second of four machines; the baseline is in slice 1. Needs --run-name, the same on every shard, and --results on a filesystem they share. Running the same command again finishes that shard's missing cells."),
    format_: str = typer.Option("table", "--format", help="How the table at the end is printed: table, md, csv or json (md, csv and json go to stdout alone, everything else to stderr). report.md/.csv/.json are written either way."),
) -> None:
    if format_ not in RUN_FORMATS:
        fail(f"unknown --format '{format_}': choose one of {', '.join(RUN_FORMATS)} ('report RUN_DIR --format html' makes the HTML file)")
    if format_ != "table":
        ctx.call_on_close(messages_to_stderr())

    try:
        run = run_matrix(
            strategies, matrix=matrix, preset=preset, overrides=set_, model=model, train_file=train_file,
            eval_file=eval_file, device=device, results=results, run_name=run_name, repeat=repeat, vary_seed=vary_seed,
            cell_timeout=cell_timeout, force=force, allow_busy_gpu=allow_busy_gpu, gpu_memory_limit=gpu_memory_limit,
            memory_snapshot=memory_snapshot, gpus=gpus, nproc_per_node=nproc_per_node, nnodes=nnodes,
            node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, estimate=estimate, output=output(), allocator=allocator,
            shard=shard,
        )
    except ValueError as error:
        fail(str(error))

    if format_ == "table":
        print_table(results_table(run.frame, run.measure, title=f"gputech-bench: {run.name}"), hint=MORE_HINT)
    else:
        try:
            sys.stdout.write(run.render(format_))
            sys.stdout.flush()
        except (OSError, ResultError) as error:
            errors.print(f"[yellow]warning:[/] could not render the table as {format_} ({error}); the cell results are in {run.path}")
    for result in run.results:
        for note in result.notes:
            console.print(f"  [dim]{result.cell}:[/] {note}", highlight=False)
    if run.exports:
        console.print(f"results: {run.path} ({', '.join(path.name for path in run.exports)})", highlight=False)
    console.print(f"matrix wall time: {run.seconds:,.0f} s", highlight=False)
    if run.missing_line:
        console.print(f"{run.missing_line}: 'gputech-bench report {run.path}' shows them once their shards are done",
                      highlight=False)
    if run.estimate is not None:
        print_against_measured(run.estimate.report)
    elif estimate and (nproc_per_node > 1 or nnodes > 1):
        console.print(f"[dim]no memory estimate: {run.estimate_skipped}[/]", highlight=False)

    if run.interrupted:
        again = f"--run-name {run.name}" + (f" --shard {run.shard.label}" if run.shard else "")
        console.print(f"interrupted: re-run with {again} to finish {', '.join(run.unfinished)}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if run.unfinished:  # this call's cells: a failed cell from an earlier call is in the table, not the exit code
        raise typer.Exit(EXIT_FAILED_CELL)


def register(app: typer.Typer) -> None:
    app.command(help=RUN_HELP)(run)
