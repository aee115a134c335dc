"""Run cells one process each and collect their results.

The runner itself never touches CUDA: each worker starts with a fresh allocator
and context, so one cell's fragmentation, leaks or crash cannot affect the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import BenchConfig, to_dict
from .results import SCHEMA, ResultError, read_result, write_atomic

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps its files: one folder, one JSON per cell."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def result_path(self, cell: str) -> Path:
        return self.root / f"{cell}.json"

    def log_path(self, cell: str) -> Path:
        return self.root / "logs" / f"{cell}.log"


def write_run_config(layout: RunLayout, config: BenchConfig) -> None:
    write_atomic(layout.config_path, to_dict(config))


def worker_command(cell: str, layout: RunLayout) -> list[str]:
    return [
        sys.executable, "-m", "gputech_bench.worker",
        "--cell", cell, "--config", str(layout.config_path), "--out", str(layout.result_path(cell)), "--events",
    ]


def run_worker(cell: str, layout: RunLayout, on_event: EventCallback) -> dict[str, Any]:
    """Start the worker, relay its events, and return its result (or a ``crashed`` one)."""
    layout.log_path(cell).parent.mkdir(parents=True, exist_ok=True)
    with layout.log_path(cell).open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            worker_command(cell, layout), stdout=subprocess.PIPE, stderr=log, text=True, env=os.environ.copy()
        )
        assert process.stdout is not None
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.write(line)  # a library printing to stdout; keep it, don't crash the display
                continue
            on_event(cell, event)
        returncode = process.wait()
    try:
        return read_result(layout.result_path(cell))
    except ResultError:
        reason = f"worker exited with code {returncode} without writing a result (see {layout.log_path(cell)})"
        if returncode < 0:
            reason = f"worker killed by signal {-returncode} (see {layout.log_path(cell)})"
        crashed = {
            "schema": SCHEMA, "cell": cell, "status": "crashed", "reason": reason,
            "metrics": {}, "memory_breakdown": {}, "notes": [],
        }
        write_atomic(layout.result_path(cell), crashed)
        return crashed
