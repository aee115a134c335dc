"""Harness overhead, two ways.

1. Per step (the default): the worker's baseline cell against a bare training loop. Both run in a fresh process on the same model, batches and optimizer (AdamW,
linear schedule, clipping): the bare loop has no strategies, no plan, no events,
no memory tracker. The first steps of each are warm-up and are not timed.

    python benchmarks/overhead.py                      # cpu preset, on this machine
    python benchmarks/overhead.py --preset seed --steps 30 --set device=cuda

Targets: the worker's steady-state step time within 5% of the bare loop, and on
CUDA its peak allocated memory within 2%. Prints the ratios; asserts nothing.

2. Around the cells (``--startup``): one ``gputech-bench run``, in this process, exactly as
the command line runs it, with the matrix's wall time, the sum of the cells' own
``cell_seconds``, the share of the wall spent outside the cells (``1 - sum/wall``), each
cell's start-up (the runner starting it to its first event) and the post-run estimate's
wall time. Every argument after ``--startup`` goes to ``gputech-bench run``:

    python benchmarks/overhead.py --startup --matrix --preset cpu
    python benchmarks/overhead.py --startup --strategies 1,2,3,lora --preset cpu --json overhead.json

Targets (issue 15): outside the cells <= 10% of the matrix's wall time on the cpu
preset, and a CPU cell's start-up <= 1 s. Timings are as noisy as the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 2  # the worker never times its first (warm-up) and second (memory-tracked) steps


def bare_loop(config_path: str, steps: int) -> dict:
    """The training step with nothing around it."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from gputech_bench.config import from_dict
    from gputech_bench.data.prepare import prepare_data
    from gputech_bench.measure.timing import synchronize
    from gputech_bench.modeling import build_model
    from gputech_bench.training.batches import epoch_batches
    from gputech_bench.worker.cell import resolve_device

    config = from_dict(json.loads(Path(config_path).read_text()))
    device = resolve_device(config.device)
    data = prepare_data(config)
    model = build_model(config.model, data.tokenizer_size, data.pad_token_id, config.train.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, eps=config.train.adam_eps, foreach=False)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    times = []
    batches = epoch_batches(data.train, data.masking, config.train.batch_size, config.train.seed, 0, config.data.objective)
    for step, batch in zip(range(steps), batches):
        synchronize(device)
        start = time.perf_counter()
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"mean_step_seconds": sum(times) / len(times), "peak_allocated_mib": peak, "timed_steps": len(times)}


def worker_cell(config_path: str, out: Path) -> dict:
    subprocess.run(
        [sys.executable, "-m", "gputech_bench.worker", "--cell", "baseline", "--config", config_path, "--out", str(out)],
        check=True, stderr=subprocess.DEVNULL,
    )
    result = json.loads(out.read_text())
    metrics = {name: entry["value"] for name, entry in result["metrics"].items()}
    return {
        "mean_step_seconds": metrics["mean_step_seconds"],
        "peak_allocated_mib": metrics.get("peak_allocated_mib"),
        "timed_steps": metrics["steps_run"] - WARMUP_STEPS,
    }


def startup(run_args: list[str], json_path: str | None) -> None:
    """Run ``gputech-bench run RUN_ARGS`` here, timing the runner's calls from outside.

    The command runs through the API (api/_run.py), which looks the runner's ``run_cells`` and
    its ``_estimate_run`` up when it runs, so wrapping them here times the command's own path,
    whatever starts its cells."""
    import gputech_bench.api._run as runner
    from gputech_bench.cli import app

    started: dict[str, float] = {}
    first_event: dict[str, float] = {}
    times: dict[str, float] = {}
    outcomes = []
    run_matrix, estimate_run = runner.run_cells, runner._estimate_run

    def timed_matrix(cells, folder, **options):
        on_start, on_event = options["on_cell_start"], options["on_event"]

        def cell_started(index, label, slot):
            started[label] = time.perf_counter()
            on_start(index, label, slot)

        def event(label, payload):
            first_event.setdefault(label, time.perf_counter())
            on_event(label, payload)

        begin = time.perf_counter()
        outcome = run_matrix(cells, folder, **{**options, "on_cell_start": cell_started, "on_event": event})
        times["matrix"] = time.perf_counter() - begin
        outcomes.append((outcome, folder))
        return outcome

    def timed_estimate(*args, **options):
        begin = time.perf_counter()
        try:
            return estimate_run(*args, **options)
        finally:
            times["estimate"] = time.perf_counter() - begin

    runner.run_cells, runner._estimate_run = timed_matrix, timed_estimate
    begin = time.perf_counter()
    try:
        app(["run", *run_args], standalone_mode=False)
    except SystemExit:
        pass
    finally:
        runner.run_cells, runner._estimate_run = run_matrix, estimate_run
    times["command"] = time.perf_counter() - begin
    if not outcomes:
        sys.exit("the run did not reach its cells (see its message above)")
    outcome, folder = outcomes[0]
    reused = set(outcome.reused)
    cells = [
        {"cell": result.cell, "status": result.status, "cell_seconds": result.value("cell_seconds"),
         "startup_seconds": round(first_event[result.cell] - started[result.cell], 3) if result.cell in first_event else None}
        for result in outcome.results if result.cell not in reused
    ]
    cell_sum = sum(cell["cell_seconds"] or 0.0 for cell in cells)
    summary = {
        "command": ["gputech-bench", "run", *run_args],
        "run_folder": str(folder.root),
        "matrix_wall_seconds": round(times["matrix"], 3),
        "cell_seconds_sum": round(cell_sum, 3),
        "outside_cells_fraction": round(1 - cell_sum / times["matrix"], 4),
        "estimate_seconds": None if "estimate" not in times else round(times["estimate"], 3),
        "command_seconds": round(times["command"], 3),
        "cells": cells,
    }
    print(f"\nharness overhead of: gputech-bench run {' '.join(run_args)}")
    print(f"matrix wall time   : {summary['matrix_wall_seconds']:8.1f} s")
    print(f"sum of cell_seconds: {cell_sum:8.1f} s")
    print(f"outside the cells  : {100 * summary['outside_cells_fraction']:8.1f} % of the wall  (target <= 10%)")
    for cell in cells:
        spawn = "-" if cell["startup_seconds"] is None else f"{cell['startup_seconds']:.2f} s"
        print(f"  {cell['cell']:<12} start-up {spawn:>8}   cell_seconds {cell['cell_seconds'] or 0:7.1f} s   {cell['status']}")
    if summary["estimate_seconds"] is not None:
        print(f"post-run estimate  : {summary['estimate_seconds']:8.1f} s")
    print(f"whole command      : {summary['command_seconds']:8.1f} s")
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    if "--startup" in sys.argv[1:]:
        rest = [arg for arg in sys.argv[1:] if arg != "--startup"]
        json_path = None
        if "--json" in rest:
            at = rest.index("--json")
            json_path, rest = rest[at + 1], rest[:at] + rest[at + 2:]
        startup(rest, json_path)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side (the first 2 are not timed)")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="config override, as in gputech-bench")
    parser.add_argument("--repeat", type=int, default=3, help="pairs of runs, alternating sides; medians are compared")
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare loop on this config file
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.steps)))
        return

    from gputech_bench.config import apply_overrides, load_preset, to_dict

    config = apply_overrides(load_preset(args.preset), [f"train.max_steps={args.steps}", *args.sets])
    bares, harnesses = [], []
    with tempfile.TemporaryDirectory() as folder:
        config_path = str(Path(folder) / "config.json")
        Path(config_path).write_text(json.dumps(to_dict(config)))
        # Same start-up conditions: each side in its own fresh process, alternating, so
        # that a noisy neighbour slows both sides rather than one.
        for _ in range(args.repeat):
            bares.append(json.loads(subprocess.run(
                [sys.executable, __file__, "--bare", config_path, "--steps", str(args.steps)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]))
            harnesses.append(worker_cell(config_path, Path(folder) / "baseline.json"))

    bare_ms = sorted(run["mean_step_seconds"] * 1000 for run in bares)
    worker_ms = sorted(run["mean_step_seconds"] * 1000 for run in harnesses)
    bare, harness = bares[0], harnesses[0]
    ratio = statistics.median(worker_ms) / statistics.median(bare_ms)
    print(f"preset {args.preset}, {args.steps} steps per side ({bare['timed_steps']} timed), {args.repeat} runs each, device {config.device}")
    print(f"bare loop  : median {statistics.median(bare_ms):8.2f} ms/step  (runs: {', '.join(f'{v:.2f}' for v in bare_ms)})")
    print(f"worker     : median {statistics.median(worker_ms):8.2f} ms/step  (runs: {', '.join(f'{v:.2f}' for v in worker_ms)})")
    print(f"time overhead : {100 * (ratio - 1):+.1f}% of the median  (target within 5%)")
    if bare["peak_allocated_mib"] and harness["peak_allocated_mib"]:
        memory = harness["peak_allocated_mib"] / bare["peak_allocated_mib"]
        print(f"peak allocated: bare {bare['peak_allocated_mib']:,.0f} MiB, worker {harness['peak_allocated_mib']:,.0f} MiB, "
              f"{100 * (memory - 1):+.1f}%  (target within 2%)")
    else:
        print("peak allocated: CUDA only (torch.cuda.max_memory_allocated); not compared on CPU")


if __name__ == "__main__":
    main()
