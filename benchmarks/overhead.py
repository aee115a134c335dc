"""Harness overhead: the worker's baseline cell against a bare training loop.

Both run in a fresh process on the same model, batches and optimizer (AdamW,
linear schedule, clipping): the bare loop has no strategies, no plan, no events,
no memory tracker. The first steps of each are warm-up and are not timed.

    python benchmarks/overhead.py                      # cpu preset, on this machine
    python benchmarks/overhead.py --preset seed --steps 30 --set device=cuda

Targets: the worker's steady-state step time within 5% of the bare loop, and on
CUDA its peak allocated memory within 2%. Prints the ratios; asserts nothing.
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


def main() -> None:
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
