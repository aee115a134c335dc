"""Run a matrix: one worker process per cell, failures as rows, safe to re-run.

The runner itself never touches CUDA: each worker starts with a fresh allocator and
context, so one cell's fragmentation, leaks or crash cannot affect the next. How a worker
starts is its launcher's business (``launcher``): a CPU cell's worker is forked from a
preloaded fork server, still a process of its own without paying the imports again; CUDA
cells and torchrun launches start a fresh interpreter. What to run, where, how often and
for how long is one ``RunRequest`` (``request``). Results
are written atomically, one file per cell, so a runner killed at any moment loses
nothing that had finished, and a re-run with the same name picks up where it stopped.

With several GPU slots (``--gpus``) cells run at the same time, one per slot; with
``--nproc-per-node`` each cell is a torchrun launch whose ranks' results are merged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import config_changes, to_dict
from ..errors import ConfigError, ResultError
from ..files import create_exclusive_json, write_json
from ..results import CellResult, RunFolder, merge_ranks, merge_repeats, read_result, write_result
from .launch import Slot
from .launcher import Launcher, WorkerCall, WorkerProcess
from .ranks import clear_rank_results, describe_launch, read_rank_results
from .request import RunRequest
from .shard import record_plan
from .slots import run_on_slots

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Listeners:
    """What the runner tells as it goes, for a progress display: a worker's events by its
    label, and each job (a cell, or one repeat of it) starting and ending by its index."""

    on_event: EventCallback = lambda label, event: None
    on_cell_start: Callable[[int, str, Slot], None] = lambda index, label, slot: None
    on_cell_end: Callable[[int, CellResult], None] = lambda index, result: None


#: Nobody listening: a run from a script that shows no progress.
SILENT = Listeners()

#: How often the runner looks up from waiting on a worker, to act on Ctrl-C promptly.
WAIT_SLICE_SECONDS = 0.2
#: How long a worker gets to write its result after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 20.0


@dataclass(frozen=True)
class Job:
    """One worker process: a cell, or one repeat of it (``--repeat``)."""

    cell: str
    #: 1..N with --repeat N; 0 when the cell runs once.
    repeat: int = 0
    #: train.seed for this run; None keeps the config's.
    seed: int | None = None

    @property
    def label(self) -> str:
        """Names its result, log and progress line."""
        return f"{self.cell}.rep{self.repeat}" if self.repeat else self.cell


def job_result_path(folder: RunFolder, job: Job) -> Path:
    """A repeat's own file; a cell run once writes the cell's result directly."""
    return folder.repeat_path(job.label) if job.repeat else folder.result_path(job.cell)


def plan_jobs(cells: list[str] | tuple[str, ...], repeats: int = 1, seeds: tuple[int, ...] | list[int] | None = None) -> list[Job]:
    """Every cell once, or every cell ``repeats`` times, round-robin: the first repeat of each
    cell, then the second of each... so that drift in the machine (heat, other load) is
    spread over the cells instead of landing on the last ones."""
    if repeats <= 1:
        return [Job(cell) for cell in cells]
    return [Job(cell, repeat, seeds[repeat - 1] if seeds else None) for repeat in range(1, repeats + 1) for cell in cells]


def prepare_run_dir(request: RunRequest) -> None:
    """Create the run folder and save the resolved config; refuse to mix two configs in one run.

    A shard (``--shard K/N``) shares the folder with shards running at the same time on other
    machines: the first to get there writes config.json and shards.json, each only if absent
    (``files.create_exclusive_json``), and every other shard must match both, ``--force`` or not."""
    if request.sharding is not None:
        _prepare_shard(request)
        return
    folder = request.folder
    current = to_dict(request.config)
    if folder.config_path.exists() and not request.schedule.force:
        try:
            saved = json.loads(folder.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = None
        if not isinstance(saved, dict):
            raise ConfigError(f"{folder.config_path} is unreadable: delete it, or pass --force to start the run over")
        differences = [key for key, _, _ in config_changes(saved, current)]
        if differences:
            raise ConfigError(
                f"run folder {folder.root} holds results of a different config ({', '.join(differences[:4])}): "
                "use another --run-name, or --force to re-run every cell with this config"
            )
    try:
        write_json(folder.config_path, current)
    except OSError as error:
        raise ConfigError(
            f"cannot write to results folder '{folder.root}' ({error.strerror or error}): pass a writable --results DIR"
        ) from None


def _prepare_shard(request: RunRequest) -> None:
    folder, sharding = request.folder, request.sharding
    assert sharding is not None
    label = sharding.shard.label
    current = to_dict(request.config)
    try:
        created = create_exclusive_json(folder.config_path, current)
    except OSError as error:
        raise ConfigError(
            f"cannot write to results folder '{folder.root}' ({error.strerror or error}): pass a writable --results DIR"
        ) from None
    if not created:
        saved = folder.read_config()
        if saved is None:
            raise ConfigError(f"{folder.config_path} is unreadable: delete it once no shard is running, "
                              "or use another --run-name")
        differences = [key for key, _, _ in config_changes(saved, current)]
        if differences:
            raise ConfigError(
                f"shard {label}: run folder {folder.root} holds a different config ({', '.join(differences[:4])}): "
                "give every shard the same --preset, --set and files, or use another --run-name"
            )
    record_plan(folder, sharding.plan, sharding.shard)


def reusable_result(folder: RunFolder, job: Job) -> CellResult | None:
    """A finished ``ok`` result from an earlier attempt of this run, if there is one."""
    try:
        result = read_result(job_result_path(folder, job))
    except ResultError:
        return None
    return result if result.ok else None


class _DeferredCtrlC:
    """Note a Ctrl-C instead of raising it, until ``release()`` raises it where it can be handled.

    Python runs signal handlers in the main thread, so this holds whichever thread the
    kernel delivered SIGINT to. (Exec resets the handler to the default in the child.)
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.pressed = True

    def release(self) -> None:
        signal.signal(signal.SIGINT, self._previous)
        if self.pressed:
            raise KeyboardInterrupt


def _relay_events(process: WorkerProcess, cell: str, log, on_event: EventCallback) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            log.write(line)  # a library printing to stdout: keep it in the log, off the display
            log.flush()
            continue
        if isinstance(event, dict) and "event" in event:
            on_event(cell, event)


def _stop(process: WorkerProcess) -> None:
    """SIGTERM (the worker records ``interrupted``), then SIGKILL if it does not finish in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait(process: WorkerProcess, timeout: float | None, stop: threading.Event | None = None) -> None:
    """``process.wait(timeout)``, but in short slices so that Ctrl-C is acted on at once.

    The kernel may deliver SIGINT to any thread (the event relay, rich's refresh thread);
    Python then runs the handler in the main thread only when it next executes bytecode,
    which a bare ``waitpid`` would postpone until the worker exits on its own. A cell
    running beside others (``--gpus``) is told to stop through ``stop`` instead.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        remaining = WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - time.monotonic())
        if timeout is not None and remaining <= 0:
            raise subprocess.TimeoutExpired(process.args, timeout)
        try:
            process.wait(remaining)
            return
        except subprocess.TimeoutExpired:
            continue


def _in_main_thread() -> bool:
    # Only the main thread may set signal handlers; cells run beside others (--gpus) run
    # in threads, and the main thread handles Ctrl-C for all of them.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _ctrl_c_ignored():
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


@dataclass
class CellRun:
    result: CellResult
    interrupted: bool = False


def run_worker(
    job: Job,
    request: RunRequest,
    launcher: Launcher,
    on_event: EventCallback,
    slot: Slot = None,
    stop: threading.Event | None = None,
) -> CellRun:
    """Run one cell's worker as ``request`` says and return its result; a crash, timeout or
    Ctrl-C becomes a row too.

    ``launcher`` starts the worker; ``slot`` pins it to its GPUs (None: the runner's own
    devices); ``stop`` stops it from another thread."""
    label, folder, launch, timeout = job.label, request.folder, request.launch, request.schedule.cell_timeout
    # Before anything of this cell is touched and outside the Ctrl-C hold below: preloading a
    # fork server takes seconds, Ctrl-C meanwhile stops the run as between two cells, and a
    # server that cannot start leaves this cell to a fresh interpreter.
    launcher.prepare(slot)
    result_path = job_result_path(folder, job)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    if result_path.exists():
        # Keep the earlier attempt, but never mistake it for this one's result.
        folder.previous_path(label).parent.mkdir(parents=True, exist_ok=True)
        os.replace(result_path, folder.previous_path(label))
    if launch.distributed:
        clear_rank_results(RunFolder(result_path.parent), result_path.stem)
    folder.log_path(label).parent.mkdir(parents=True, exist_ok=True)
    timed_out = interrupted = False
    with folder.log_path(label).open("w", encoding="utf-8") as log:
        # Hold Ctrl-C while the worker starts: raised inside Popen, it would leave a worker
        # nobody stops. Released inside the try below, where it stops the worker properly.
        ctrl_c = _DeferredCtrlC() if _in_main_thread() else None
        try:
            call = WorkerCall(job.cell, folder.config_path, result_path, job.seed, request.cell_environment())
            process = launcher.start(call, slot, log)
        except BaseException:
            if ctrl_c:
                ctrl_c.release()
            raise
        relay = threading.Thread(target=_relay_events, args=(process, label, log, on_event), daemon=True)
        try:
            if ctrl_c:
                ctrl_c.release()
            relay.start()
            _wait(process, timeout, stop)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt:
            interrupted = True
        if timed_out or interrupted:
            with _ctrl_c_ignored():  # a second Ctrl-C must not orphan the worker
                _stop(process)
        relay.join(timeout=5)

    result = _collect_result(job, request, process)
    if job.repeat:
        result.repeat = job.repeat
    log_hint = f"see {folder.log_path(label)}"
    if timed_out and not result.ok:
        result.status, result.reason = "timeout", f"exceeded --cell-timeout of {timeout:g} s; {log_hint}"
    elif interrupted and not result.ok:
        again = "the same --run-name" + (f" and --shard {request.sharding.shard.label}" if request.sharding else "")
        result.status, result.reason = "interrupted", f"stopped by Ctrl-C; re-run with {again} to finish"
    write_result(result_path, result)
    return CellRun(result, interrupted)


def _collect_result(job: Job, request: RunRequest, process: WorkerProcess) -> CellResult:
    """The worker's result file, the merge of its ranks' files, or a row saying why there is none."""
    folder, launch = request.folder, request.launch
    cell, log_hint = job.cell, f"see {folder.log_path(job.label)}"
    result_path = job_result_path(folder, job)
    if launch.distributed:
        ranks = read_rank_results(RunFolder(result_path.parent), result_path.stem, launch)
        if any(rank.status != "crashed" for rank in ranks):
            return merge_ranks(ranks, describe_launch(launch))
    try:
        return read_result(result_path)
    except ResultError:
        pass
    if process.lost:  # a forked worker whose server died first
        return CellResult.failed(cell, "crashed", f"worker ended without a result, exit status unknown: {process.lost}; {log_hint}")
    if process.returncode is not None and process.returncode < 0:
        name = _signal_name(process.returncode)
        hint = " (the kernel's OOM killer sends SIGKILL when host memory runs out)" if name == "SIGKILL" else ""
        return CellResult.failed(cell, "crashed", f"worker killed by {name}{hint}; {log_hint}")
    return CellResult.failed(cell, "crashed", f"worker exited with code {process.returncode} without a result; {log_hint}")


@dataclass
class MatrixOutcome:
    results: list[CellResult] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0


def run_cells(request: RunRequest, launcher: Launcher, listeners: Listeners = SILENT) -> MatrixOutcome:
    """Run the request's cells (each ``repeats`` times), one per slot at a time, each worker
    started by ``launcher``; stops early only on Ctrl-C, never on a failed cell.

    ``listeners`` see jobs (a cell, or one repeat of it) by their index in the job list
    and their label. The outcome's results are per cell, in the order of the cells,
    whichever slot finished first; repeats are aggregated into their cell's result."""
    started = time.perf_counter()
    outcome = MatrixOutcome()
    cells, folder, slots, repeats = request.cells, request.folder, request.slots, request.schedule.repeats
    on_cell_end = listeners.on_cell_end
    jobs = plan_jobs(cells, repeats, request.schedule.seeds)
    results: dict[int, CellResult] = {}
    pending: list[tuple[int, Job]] = []
    for index, job in enumerate(jobs):
        previous = None if request.schedule.force else reusable_result(folder, job)
        if previous is None:
            pending.append((index, job))
            continue
        results[index] = previous
        outcome.reused.append(job.label)
        on_cell_end(index, previous)

    stop = threading.Event()

    def run_one(item: tuple[int, Job], slot: Slot) -> bool:
        index, job = item
        listeners.on_cell_start(index, job.label, slot)
        run = run_worker(job, request, launcher, listeners.on_event, slot, None if len(slots) == 1 else stop)
        results[index] = run.result
        on_cell_end(index, run.result)
        if run.interrupted:
            outcome.interrupted = True
        return not run.interrupted

    try:
        if len(slots) == 1:
            for item in pending:  # in this thread, where Ctrl-C arrives
                if not run_one(item, slots[0]):
                    break
        else:
            run_on_slots(pending, list(slots), run_one, stop)
    except KeyboardInterrupt:  # between cells, or while parallel cells were stopped and recorded
        outcome.interrupted = True
    if repeats <= 1:
        outcome.results = [results[index] for index in sorted(results)]
    else:
        outcome.results = _aggregate_repeats(cells, jobs, results, folder, repeats)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _aggregate_repeats(
    cells: tuple[str, ...], jobs: list[Job], results: dict[int, CellResult], folder: RunFolder, repeats: int
) -> list[CellResult]:
    """Each cell's result from the repeats that ran, written beside the single-run results."""
    aggregated = []
    for cell in cells:
        indexed = sorted((job.repeat, index) for index, job in enumerate(jobs) if job.cell == cell and index in results)
        if not indexed:
            continue
        seeds = [job.seed for job in jobs if job.cell == cell]
        result = merge_repeats(cell, [results[index] for _, index in indexed], repeats, seeds)
        write_result(folder.result_path(cell), result)
        aggregated.append(result)
    return aggregated
