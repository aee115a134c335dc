"""Run one matrix cell in its own process and always leave one JSON result behind.

    python -m gputech_bench.worker --cell 1+2+3 --config resolved.json --out results/x/1+2+3.json

The result's status is ``ok``, ``oom``, ``error`` or ``interrupted``, with the
reason and the last traceback lines. With ``--events`` the worker also prints one
JSON object per line on stdout (phases and steps) for a runner to display.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..errors import ConfigError
from ..measure.oom import oom_details, oom_reason
from ..results import CellResult, RunFolder, write_result
from .failure import classify
from .provenance import process_origin, utc_now


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gputech_bench.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", required=True, help="strategy combination, e.g. baseline, 1, 1+2+3, lora")
    parser.add_argument("--config", required=True, type=Path, help="resolved config JSON (as saved in results)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the result JSON")
    parser.add_argument("--events", action="store_true", help="print JSON-lines progress events on stdout")
    parser.add_argument("--seed", type=int, help="train.seed for this run (a repeat with --vary-seed)")
    return parser.parse_args(argv)


def _stderr_progress(event: dict[str, Any]) -> None:
    if event["event"] == "phase":
        print(f"[worker] {event['phase']}...", file=sys.stderr, flush=True)
    elif event["event"] == "step":
        step, total = event["step"], event["total"]
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            print(f"[worker] step {step}/{total} loss {event['loss']:.4f}", file=sys.stderr, flush=True)


def _stdout_events(event: dict[str, Any]) -> None:
    try:
        print(json.dumps(event), flush=True)
    except BrokenPipeError:
        # The runner reading the events is gone (killed): it would have stopped this cell, and
        # its SIGTERM may simply not have landed yet. Stop as interrupted, not as an error, and
        # send what is left of stdout nowhere, so that exiting does not fail on the pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise KeyboardInterrupt from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def read_config(path: Path):
    try:
        return from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot use config {path} ({type(error).__name__}): pass the config.json of a run") from None


def _quiet(event: dict[str, Any]) -> None:
    """Ranks other than 0 under torchrun: rank 0 reports progress for all of them."""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Under torchrun (which sets WORLD_SIZE for every rank) each rank writes its own file,
    # and the runner merges them into --out.
    launched = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    folder = RunFolder(args.out.parent)
    out = folder.rank_path(args.out.stem, rank) if launched else args.out
    rank_info = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"])} if launched else None
    # Written even if the cell dies while torch is still importing.
    result = CellResult(args.cell, rank=rank_info, provenance={"started_at": utc_now(), "process": process_origin()})
    emit = _stdout_events if args.events else _stderr_progress
    if rank != 0:
        emit = _quiet
    try:
        # Inside the try, so that a stop landing at any moment after this still writes the result.
        # Ctrl-C at the terminal reaches the worker too, and stops the cell as interrupted, however
        # the worker was started: an inherited "ignore" (a run started in a script's background)
        # is not kept, so a worker behaves the same under every runner, torchrun and shell.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A runner (or torchrun) stops a cell with SIGTERM; treat it like Ctrl-C so the result is still written.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        config = read_config(args.config)
        if args.seed is not None:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=args.seed))
        # Heavy imports (torch, transformers) come after argument parsing so that --help is instant.
        from .cell import new_result, run_cell

        result = new_result(args.cell, config)
        result.rank = rank_info
        run_cell(args.cell, config, result, emit, snapshot_path=folder.snapshot_path(out.stem))
    except BaseException as error:  # noqa: BLE001 - every failure must become a result
        # A second Ctrl-C or SIGTERM must not cut the result file short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        status, reason, tail = classify(error)
        result.status, result.reason, result.traceback = status, reason, tail
        if status == "oom":
            result.oom = oom_details(error)
            result.reason = oom_reason(result.oom, result.memory_cap) or reason
    finally:
        result.provenance["finished_at"] = utc_now()
        write_result(out, result)
    try:
        emit({"event": "done", "status": result.status, "reason": result.reason})
    except OSError:
        pass  # the runner went away; the result file is what counts
    if not result.ok:
        print(f"[worker] {result.cell}: {result.status}: {result.reason}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
