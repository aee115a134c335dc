"""What the tests share: tiny configs, a tiny BERT, a CPU run context, a random MLM batch,
cell results as workers write them, the bytes autograd saves, a worker that only sleeps, and
the command line run in-process or as a real process. Test modules import from here, never
from each other.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner, Result

from gputech_bench.config import BenchConfig, apply_overrides
from gputech_bench.data.masking import IGNORE_INDEX
from gputech_bench.modeling import build_model
from gputech_bench.results import SCHEMA, CellResult, RunFolder, merge_repeats, write_result
from gputech_bench.run.launch import Launch, Slot
from gputech_bench.run.launcher import FreshInterpreter, WorkerCall
from gputech_bench.run.request import CellPlacement, RunRequest, Schedule
from gputech_bench.strategies import RunContext
from gputech_bench.strategies.facts import TRACED, StateLocation, TimeFactor

#: A model small enough to step in milliseconds on 2 cores.
TINY_MODEL = [
    "model.vocab_rows=0",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
]
#: A whole cell (data, train, eval) in a couple of seconds.
TINY_RUN = TINY_MODEL + [
    "data.train_sentences=96",
    "data.eval_sentences=16",
    "data.max_length=32",
    "data.tokenizer_vocab_size=400",
    "train.batch_size=16",
    "train.epochs=1",
    "strategy.micro_batch_size=4",
    "device=cpu",
]


def tiny_bert(vocab: int = 300, dropout: float = 0.0, layers: int = 2, hidden: int = 32, seed: int = 0):
    config = apply_overrides(
        BenchConfig(),
        [
            "model.vocab_rows=0",
            f"model.hidden_size={hidden}",
            f"model.num_layers={layers}",
            "model.num_heads=2",
            f"model.intermediate_size={2 * hidden}",
            "model.max_position_embeddings=128",
            f"model.dropout={dropout}",
        ],
    )
    return build_model(config.model, vocab, 0, seed)


def context(*overrides: str) -> RunContext:
    return RunContext(apply_overrides(BenchConfig(), ["device=cpu", *overrides]), torch.device("cpu"), new_head_modules=())


def random_batch(size: int, length: int, vocab: int, seed: int = 0, mask_every: int = 0) -> dict[str, torch.Tensor]:
    """Token ids 5..vocab with ~15% of positions as MLM targets (or every ``mask_every``-th one)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (size, length), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if mask_every:
        chosen = torch.zeros_like(input_ids, dtype=torch.bool)
        chosen[:, ::mask_every] = True
    else:
        chosen = torch.rand(size, length, generator=generator) < 0.15
        chosen[:, 0] = True  # at least one target per row
    labels[chosen] = input_ids[chosen]
    masked = input_ids.clone()
    masked[chosen] = 4
    return {"input_ids": masked, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# --------------------------------------------------------------------------- results


def fig(value, unit="MiB"):
    return {"value": value, "unit": unit, "method": "test fixture"}


def make_result(cell, status="ok", device="cpu", **metrics) -> CellResult:
    """A cell result as a worker would have written it, read back through the result schema."""
    strategies = {"baseline": [], "1": ["checkpointing"], "2": ["accumulation"], "3": ["adam8bit"], "4": ["mixed-precision"]}
    cuda = {"name": "NVIDIA A30", "total_memory_mib": 24576.0, "cuda_runtime": "12.4"} if device == "cuda" else {}
    return CellResult.from_dict({
        "schema": SCHEMA, "cell": cell, "status": status, "reason": None if status == "ok" else "CUDA out of memory",
        "strategies": strategies.get(cell, cell.split("+")), "preset": "test",
        "device": {"type": device} | cuda,
        "metrics": {name: fig(value) for name, value in metrics.items()},
        "memory_breakdown": {}, "notes": [],
        "provenance": {"packages": {"torch": "2.13.0"}, "python": "3.11.7", "cpu_threads": 2},
    })


def cpu_run() -> list[CellResult]:
    """A small CPU run: two ok cells and one that ran out of memory."""
    return [
        make_result("baseline", tracked_peak_mib=100.0, epoch_seconds=10.0, eval_masked_accuracy=0.40, eval_token_accuracy=0.90),
        make_result("1", tracked_peak_mib=60.0, epoch_seconds=13.0, eval_masked_accuracy=0.41, eval_token_accuracy=0.90),
        make_result("4", status="oom", tracked_peak_mib=5.0),
    ]


def run_result(cell: str, seconds: float, memory: float, accuracy: float, status: str = "ok") -> CellResult:
    """One repeat of a CPU cell."""
    figure = lambda value, unit: {"value": value, "unit": unit, "method": "measured"}  # noqa: E731
    return CellResult.from_dict({
        "schema": SCHEMA, "cell": cell, "status": status, "reason": None if status == "ok" else "boom",
        "strategies": [] if cell == "baseline" else [cell], "device": {"type": "cpu"}, "preset": "cpu",
        "memory_breakdown": {}, "notes": [],
        "metrics": {
            "epoch_seconds": figure(seconds, "s"), "epoch_time_extrapolated": figure(False, "bool"),
            "tracked_peak_mib": figure(memory, "MiB"), "eval_masked_accuracy": figure(accuracy, "fraction"),
        },
    })


def repeated(cell: str, seconds: list[float], memory: float, accuracy: list[float]) -> CellResult:
    """A cell's result merged from one repeat per entry of ``seconds`` and ``accuracy``."""
    runs = [run_result(cell, s, memory, a) for s, a in zip(seconds, accuracy)]
    return merge_repeats(cell, runs, len(runs), [222] * len(runs))


# --------------------------------------------------------------------------- mechanisms


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], around=contextlib.nullcontext) -> int:
    """Bytes autograd keeps for backward after the forward pass (run inside ``around()``, e.g.
    autocast), parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), around():
        loss = model(**batch).loss
    loss.backward()
    return sum(storages.values())


def write_run(folder: Path, results: list[CellResult]) -> Path:
    """A run folder holding ``results``, as the runner leaves it."""
    run = RunFolder(Path(folder))
    for result in results:
        write_result(run.result_path(result.cell), result)
    return Path(folder)


# --------------------------------------------------------------------------- stand-in workers

#: Says that it runs (one event on stdout), sleeps a minute, and leaves ``sys.argv[1]`` only
#: if nobody stopped it first.
_SLEEPER = ("import json, pathlib, sys, time; print(json.dumps({'event': 'phase', 'phase': 'sleeping'}), flush=True); "
            "time.sleep(60); pathlib.Path(sys.argv[1]).touch()")


def sleeping_worker(call: WorkerCall) -> list[str]:
    """In place of the worker's command line: a worker that sleeps a minute instead of training.

    Its one event tells the test it is running (rather than a guess in seconds); ``slept``
    tells whether it was stopped."""
    return [sys.executable, "-c", _SLEEPER, f"{call.out}.slept"]


class CommandLauncher(FreshInterpreter):
    """A fresh interpreter (pinned to its slot, stopped with its parent) running ``command(call)``
    instead of the worker: a stand-in worker for the runner's tests."""

    def __init__(self, command) -> None:
        self.stand_in = command

    def command(self, call: WorkerCall) -> list[str]:
        return self.stand_in(call)


def run_request(folder: RunFolder, cells: tuple[str, ...] = ("1",), *, slots: tuple[Slot, ...] = (None,),
                cell_timeout: float | None = None, config: BenchConfig | None = None) -> RunRequest:
    """A request for ``cells`` into ``folder``: run once each, in one plain process each, nothing reused."""
    return RunRequest(
        config or BenchConfig(), cells, CellPlacement(Launch(), slots),
        Schedule(repeats=1, seeds=None, vary_seed=False, cell_timeout=cell_timeout, force=False), folder,
    )


def slept(out: Path) -> bool:
    """Whether the sleeping worker whose result goes to ``out`` slept its whole minute: nobody stopped it."""
    return Path(f"{out}.slept").exists()


# --------------------------------------------------------------------------- the command line


def invoke(*args: str) -> Result:
    """``gputech-bench ARGS`` in this process (typer's CliRunner): milliseconds, not an interpreter's start-up."""
    from gputech_bench.cli import app

    return CliRunner().invoke(app, list(args))


def gputech(*args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m gputech_bench ARGS`` as a real process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gputech_bench", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def assert_one_line_error(exit_code: int, stderr: str, *fragments: str) -> None:
    """Bad input: exit status 2 and one line on stderr that holds every fragment, no traceback."""
    assert exit_code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


class NoOpFacts:
    """The facts every strategy declares, as a test double that changes nothing declares them:
    mixed in before Strategy (``class Double(NoOpFacts, Strategy)``), so registration accepts it."""

    time_factor = TimeFactor(1.0, "a test double: changes nothing")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries: tuple[str, ...] = ()
    micro_batch_counts: tuple[int, ...] = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
