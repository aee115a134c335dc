"""How a cell's worker process starts: one protocol, three ways.

- :class:`FreshInterpreter`: ``python -m gputech_bench.worker ...``, pinned to its slot's GPUs.
  Every CUDA cell starts so: a fresh allocator and context per cell.
- :class:`ForkedChild`: a child of the run's preloaded fork server (``forkserver``), for CPU
  cells: a process of its own without paying the imports again. A server that cannot start
  or fork leaves the cell to a fresh interpreter, which says why in the cell's log.
- :class:`Torchrun`: ``python -m torch.distributed.run ... -m gputech_bench.worker ...``, whose
  ranks each write a result for the runner to merge (``--nproc-per-node``).

The runner asks its launcher to ``start`` a worker and gets a :class:`WorkerProcess` back,
the part of ``subprocess.Popen`` it uses, whichever way the process started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from .. import worker as worker_package
from ..worker.__main__ import main as worker_main
from .forkserver import Entry, ForkServer, ForkServerError
from .launch import Launch, Slot, die_with_parent, slot_environment

#: What every forked CPU cell imports, besides what its caller adds (the estimate's tracer):
#: the worker's cell module (torch, the project), the default model's class and the
#: tokenizer stack (both imported where used, so named here). Not peft or bitsandbytes:
#: only the cells that use them import them.
WORKER_PRELOAD = (
    worker_main.__module__,
    f"{worker_package.__name__}.cell",
    "transformers.models.bert.modeling_bert",
    "tokenizers",
    "transformers.tokenization_utils_tokenizers",
)


@dataclass(frozen=True)
class WorkerCall:
    """One worker's own arguments, however its process is started."""

    cell: str
    config_path: Path
    out: Path
    #: train.seed for this run (a repeat with --vary-seed); None keeps the config's.
    seed: int | None
    #: Variables set in the worker's environment over the runner's (``RunRequest.cell_environment``):
    #: every launcher applies them before the worker runs.
    environment: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        worker = ["--cell", self.cell, "--config", str(self.config_path), "--out", str(self.out), "--events"]
        return worker + ([] if self.seed is None else ["--seed", str(self.seed)])


class WorkerProcess(Protocol):
    """A started worker: what the runner reads and how it stops it."""

    @property
    def args(self) -> Any: ...
    @property
    def stdout(self) -> IO[str] | None: ...
    @property
    def returncode(self) -> int | None: ...
    @property
    def lost(self) -> str | None:
        """Why the exit status is unknown (a forked worker whose server died first); None when known."""

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts a cell's worker process; ``fork_server`` is the server its children come from, if any."""

    @property
    def fork_server(self) -> ForkServer | None: ...

    def prepare(self, slot: Slot) -> None:
        """What may take seconds before a worker on ``slot`` starts (preloading the fork server):
        run before the runner holds Ctrl-C back, so that Ctrl-C meanwhile stops the run."""

    def start(self, call: WorkerCall, slot: Slot, log: IO[str]) -> WorkerProcess:
        """The worker of ``call``, pinned to ``slot``: events on its ``stdout``, everything else in ``log``."""
        ...

    def close(self) -> None: ...


class InterpreterProcess(subprocess.Popen):
    """A worker in an interpreter of its own: its exit status is always known."""

    lost: str | None = None


class FreshInterpreter:
    """``python -m gputech_bench.worker ARGS``: a new interpreter for every cell."""

    fork_server: ForkServer | None = None

    def command(self, call: WorkerCall) -> list[str]:
        return [sys.executable, "-m", worker_package.__name__, *call.argv()]

    def prepare(self, slot: Slot) -> None:
        pass  # nothing is started ahead of the cells

    def start(self, call: WorkerCall, slot: Slot, log: IO[str]) -> WorkerProcess:
        return InterpreterProcess(
            self.command(call), stdout=subprocess.PIPE, stderr=log, text=True,
            env=slot_environment(slot, {**os.environ, **call.environment}),
            preexec_fn=die_with_parent if os.name == "posix" else None,
        )

    def close(self) -> None:
        pass


class Torchrun(FreshInterpreter):
    """torchrun (``python -m torch.distributed.run``) starting the worker's ranks, with ``launch``'s options."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch

    def command(self, call: WorkerCall) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", *self.launch.torchrun_options(),
                "-m", worker_package.__name__, *call.argv()]


class ForkedChild:
    """A child of ``server`` running the worker's ``main``; a fresh interpreter when the server
    cannot serve, or for a cell pinned to GPUs (a forked process must never hold CUDA)."""

    #: What the child runs with the worker's arguments.
    worker_entry: Entry = worker_main

    def __init__(self, server: ForkServer) -> None:
        self.server = server
        self.fallback = FreshInterpreter()

    @property
    def fork_server(self) -> ForkServer | None:
        return self.server

    def prepare(self, slot: Slot) -> None:
        # A server that cannot start leaves its cells to fresh interpreters: start() says why there.
        # A cell pinned to GPUs is never forked, so it never waits for the server.
        if slot is None:
            self.server.start()

    def start(self, call: WorkerCall, slot: Slot, log: IO[str]) -> WorkerProcess:
        if slot is None:
            try:
                return self.server.spawn_piped(self.worker_entry, call.argv(), log, call.environment)
            except ForkServerError as error:
                # As before the fork server existed: a fresh interpreter, which reports in the cell's
                # own result whatever stopped the server from preloading.
                log.write(f"[runner] fresh interpreter for this cell: {error}\n")
                log.flush()
        return self.fallback.start(call, slot, log)

    def close(self) -> None:
        self.server.close()


def fork_server_suits(cuda: bool, launch: Launch) -> bool:
    """Whether a run's cells may be forked from a preloaded server: CPU cells in one plain
    process each. A CUDA cell keeps a fresh interpreter (a process that holds CUDA cannot be
    forked safely, and keeping CUDA out of the server is simplest where minutes of GPU work
    dwarf the start-up), and so does a torchrun launch (torchrun starts its own ranks)."""
    return not cuda and not launch.distributed


def launcher_for(launch: Launch, cuda: bool, fork_server_log: Path, preload: tuple[str, ...]) -> Launcher:
    """The launcher of a run's cells: torchrun for ``--nproc-per-node``, the fork server
    (preloading ``preload``, logging to ``fork_server_log``) for CPU cells, else fresh interpreters."""
    if launch.distributed:
        return Torchrun(launch)
    if fork_server_suits(cuda, launch):
        return ForkedChild(ForkServer(fork_server_log, preload))
    return FreshInterpreter()
