"""Predict the memory of many setups: one fake trace each, in parallel processes.

A setup is a cell plus, for cells with accumulation, a micro-batch size; ``fit``
tries several of those per cell. Traces are independent and single-threaded
Python, so a pool of processes divides the wall time by the cores it gets.

One trace pool (:class:`TracePool`), two back ends: fresh interpreters started by
``multiprocessing``'s spawn (:class:`SpawnedTraces`), or, after a CPU run whose fork server
is still up, children forked from that server (:class:`ForkedTraces`), which start without
importing anything. A fork server that cannot fork leaves the traces to spawned processes.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import selectors
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import BenchConfig, from_dict, to_dict
from ..errors import UserError, error_line, first_line
from ..measure.tracker import TrackedPeak
from ..modeling import model_depth
from ..run.forkserver import ForkServer, ForkServerError
from ..strategies import Cell, parse_cell
from .allocator import AllocatorSettings
from .depth import (
    Depth,
    DepthError,
    Moments,
    depth_facts,
    depth_to_extrapolate,
    extrapolate_peak,
    extrapolate_reserved,
    peak_of_moments,
)
from .modelled import modeller_for
from .reserved import ReservedRange, predict_reserved
from .trace import (
    Limit,
    describe_target,
    describe_target_in_child,
    is_stand_in,
    trace_cell,
    trace_inputs,
    trace_target,
)


@dataclass(frozen=True)
class Setup:
    """What one trace runs: a cell, and the micro-batch size when the cell accumulates."""

    cell: str
    micro_batch_size: int | None = None
    #: Ranks the setup runs on (``--nproc-per-node`` x ``--nnodes``): the trace is rank 0's.
    world_size: int = 1

    @property
    def label(self) -> str:
        return self.cell if self.micro_batch_size is None else f"{self.cell} (micro {self.micro_batch_size})"

    def config_for(self, config: BenchConfig) -> BenchConfig:
        if self.micro_batch_size is None:
            return config
        return dataclasses.replace(
            config, strategy=dataclasses.replace(config.strategy, micro_batch_size=self.micro_batch_size)
        )


@dataclass(frozen=True)
class Prediction:
    """The traced peak of one setup: tensors on the compute device and on the host."""

    setup: Setup
    device: TrackedPeak
    host: TrackedPeak | None
    trace_seconds: float
    facts: dict[str, Any]
    #: Why the setup could not be traced (its peaks are then zero); None when it was.
    error: str | None = None
    #: How the figures were modelled around a trace (``modelled.py``); None when traced as they are.
    modelled: str | None = None
    #: The trace stopped once the device passed the limit ``fit`` gave it: ``device`` is a
    #: lower bound of the peak, enough to know the setup does not fit.
    stopped: bool = False
    #: The caching allocator's reserved peak, replayed from the traced allocations
    #: (``reserved.py``); None where there was no sequence to replay (a modelled figure, a
    #: stopped trace) or the allocator settings are ones the model does not follow.
    reserved: ReservedRange | None = None
    #: Why ``reserved`` is None for a traced setup (an allocator setting the model does not follow).
    reserved_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.setup.cell,
            "micro_batch_size": self.setup.micro_batch_size,
            "world_size": self.setup.world_size,
            "device": dataclasses.asdict(self.device),
            "host": None if self.host is None else dataclasses.asdict(self.host),
            "trace_seconds": round(self.trace_seconds, 3),
            "facts": self.facts,
            "error": self.error,
            "source": self.source,
            "modelled": self.modelled,
            "stopped": self.stopped,
            "reserved": None if self.reserved is None else self.reserved.to_dict(),
            "reserved_note": self.reserved_note,
        }

    @property
    def source(self) -> str:
        """How the figure came about, in one word: traced, stand-in (traced under the estimate's own
        autocast rules), modelled or untraced."""
        if self.error:
            return "untraced"
        if is_stand_in(self.modelled):
            return "stand-in"
        return "modelled" if self.modelled else "traced"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Prediction":
        host = data.get("host")
        return cls(
            Setup(data["cell"], data.get("micro_batch_size"), int(data.get("world_size") or 1)),
            TrackedPeak(**data["device"]),
            None if host is None else TrackedPeak(**host),
            float(data.get("trace_seconds", 0.0)),
            dict(data.get("facts", {})),
            data.get("error"),
            data.get("modelled"),
            bool(data.get("stopped", False)),
            None if data.get("reserved") is None else ReservedRange.from_dict(data["reserved"]),
            data.get("reserved_note"),
        )


def _uses_accumulation(cell: str) -> bool:
    return any(cls.micro_batch_counts for cls in parse_cell(cell).strategies)


def setups_for(cells: Iterable[str], config: BenchConfig, world_size: int = 1) -> list[Setup]:
    """The cells as ``run`` would train them: accumulation at the config's micro-batch size, on ``world_size`` ranks."""
    return [
        Setup(cell, config.strategy.micro_batch_size if _uses_accumulation(cell) else None, world_size)
        for cell in cells
    ]


# Each pool process keeps its trace inputs between setups: tokenising is the slow part.
_worker_inputs: dict[str, Any] = {}


def _single_threaded() -> None:
    # A trace computes nothing; extra intra-op threads per process only contend for the cores.
    import torch

    torch.set_num_threads(1)


def _trace_cost(setup: Setup, config: BenchConfig) -> int:
    """Relative trace time: one tracked forward and backward per micro-batch."""
    return config.train.batch_size // setup.micro_batch_size if setup.micro_batch_size else 1


def _inputs_key(config_data: dict[str, Any]) -> str:
    return repr(sorted(config_data.items()))


def _cached_inputs(config_data: dict[str, Any], config: BenchConfig):
    """The trace inputs of ``config_data``, prepared once per process (the last config's only)."""
    key = _inputs_key(config_data)
    if key not in _worker_inputs:
        _worker_inputs.clear()
        _worker_inputs[key] = trace_inputs(config)
    return _worker_inputs[key]


def allocator_settings(conf: str | None) -> tuple[AllocatorSettings | None, str | None]:
    """The allocator model's settings for ``PYTORCH_CUDA_ALLOC_CONF`` text, or why there are none."""
    try:
        return AllocatorSettings.from_conf(conf), None
    except ValueError as error:
        return None, (f"reserve not replayed: PYTORCH_CUDA_ALLOC_CONF={conf}: {error}; a flat "
                      "reserve stands in")


@dataclass(frozen=True)
class _Figures:
    """What one trace (or a model around one) gives a prediction."""

    device: TrackedPeak
    host: TrackedPeak | None
    seconds: float
    facts: dict[str, Any]
    method: str | None
    stopped: bool
    reserved: ReservedRange | None
    moments: Moments


def _figures(cell: Cell, config: BenchConfig, inputs: Any, target: Any, limit: Limit | None, world_size: int,
             settings: AllocatorSettings | None, moments: bool = False) -> _Figures:
    """The cell traced (or modelled around a trace), with its replayed reserve."""
    modeller = modeller_for(cell, target.device.type)
    if modeller is not None:
        out = modeller.run(cell, config, inputs, target, limit, world_size)
        reserved = None
        proxy = out.proxy
        if settings is not None and proxy is not None and proxy.allocations is not None and not out.stopped:
            reserved = predict_reserved(proxy.allocations, settings).carried_over(
                proxy.device.total_bytes, out.device.total_bytes, proxy.cell)
        return _Figures(out.device, out.host, out.seconds, out.facts, out.method, out.stopped, reserved, {})
    trace = trace_cell(cell, config, inputs, target, limit, world_size=world_size, moments=moments)
    reserved = None
    if settings is not None and trace.allocations is not None and not trace.stopped:
        reserved = predict_reserved(trace.allocations, settings).reconciled(trace.device.total_bytes,
                                                                             trace.allocations.workspace_bytes)
    # A trace that stood in for what the stand-in device cannot run (autocast) says how, as a model does.
    return _Figures(trace.device, trace.host, trace.seconds, trace.facts, trace.method, trace.stopped, reserved,
                    trace.moments)


def _extrapolated(cell: Cell, config: BenchConfig, inputs: Any, target: Any, world_size: int,
                  settings: AllocatorSettings | None, depth: Depth) -> _Figures:
    """The cell at its model's depth from two shallow traces (``depth.py``). Raises DepthError
    when they do not line up, and the cell is then traced whole."""
    shallow, deep = (_figures(cell, depth.config(config, blocks), inputs, target, None, world_size, settings, True)
                     for blocks in depth.shallow)
    if deep.moments:
        device_name = deep.device.device
        covered = peak_of_moments(deep.moments, deep.moments, device_name, 0)
        if covered is None or covered.total_bytes != deep.device.total_bytes:
            raise DepthError("the moments do not cover the traced step's peak")
        device = peak_of_moments(shallow.moments, deep.moments, device_name, depth.steps)
        host = None if deep.host is None else peak_of_moments(shallow.moments, deep.moments, deep.host.device,
                                                              depth.steps)
        how = depth.describe()
    else:  # a figure modelled around a trace has no moments: its own line
        device = extrapolate_peak(shallow.device, deep.device, depth.steps)
        host = None if deep.host is None or shallow.host is None else extrapolate_peak(shallow.host, deep.host,
                                                                                       depth.steps)
        how = depth.describe_modelled()
    if device is None:
        raise DepthError("the shallow traces have no moment on the device")
    reserved = extrapolate_reserved(deep.reserved, deep.device.total_bytes, device.total_bytes, depth)
    # A model's method names its own figures: those of the deeper shallow trace.
    method = None if deep.method is None else f"{deep.method} (at {depth.shallow[1]} blocks; {how})"
    return _Figures(device, host, shallow.seconds + deep.seconds,
                    depth_facts(deep.facts, how, (shallow.seconds, deep.seconds)), method, False, reserved, {})


def _trace_in_worker(config_data: dict[str, Any], setup: Setup, limit_bytes: int | None = None,
                     allocator_conf: str | None = None, extrapolate: bool = False) -> dict[str, Any]:
    """One setup's prediction, as a dict. ``extrapolate``: a setup on more than one rank, of a
    model deep enough, is traced at two shallow depths and extrapolated (``depth.py``)."""
    config = setup.config_for(from_dict(config_data))
    inputs = _cached_inputs(config_data, config)
    target = trace_target()
    limit = None if limit_bytes is None else Limit(limit_bytes)
    settings, note = allocator_settings(allocator_conf)
    try:
        cell = parse_cell(setup.cell)
        depth = depth_to_extrapolate(model_depth(config.model)) if extrapolate and setup.world_size > 1 else None
        figures, whole = None, None
        if depth is not None:
            try:
                figures = _extrapolated(cell, config, inputs, target, setup.world_size, settings, depth)
            except DepthError as error:
                whole = f"traced whole at {depth.blocks} blocks: {error}"  # slower, never wrong
        if figures is None:
            figures = _figures(cell, config, inputs, target, limit, setup.world_size, settings)
            if whole:
                figures = dataclasses.replace(figures, facts={**figures.facts, "depth": whole})
    except Exception as error:  # noqa: BLE001 - one setup the tracer cannot follow must not sink the others
        reason = first_line(error) if isinstance(error, UserError) else error_line(error)
        return Prediction(setup, TrackedPeak(str(target.device), 0, {}), None, 0.0, {}, reason).to_dict()
    return Prediction(setup, figures.device, figures.host, figures.seconds, figures.facts, None, figures.method,
                      figures.stopped, figures.reserved, note).to_dict()


def default_jobs() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class SpawnedTraces:
    """The spawn back end: a pool of fresh interpreters (``jobs`` of them at most), started
    on first use and kept until ``close()``."""

    def __init__(self, jobs: int, allocator_conf: str | None = None) -> None:
        self.jobs = jobs
        self.allocator_conf = allocator_conf
        self._pool: ProcessPoolExecutor | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a forked copy of a process that already imported torch can deadlock.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=context, initializer=_single_threaded)
        return self._pool

    def trace(self, setups: list[Setup], config: BenchConfig, config_data: dict[str, Any], limit: int | None,
              on_done: Callable[[Prediction], None], extrapolate: bool = False) -> None:
        pool = self._executor()
        # The longest traces first, so that no process is left with one at the end.
        ordered = sorted(setups, key=lambda setup: -_trace_cost(setup, config))
        futures = {pool.submit(_trace_in_worker, config_data, setup, limit, self.allocator_conf, extrapolate): setup
                   for setup in ordered}
        try:
            for future in as_completed(futures):
                on_done(Prediction.from_dict(future.result()))
        except BaseException:
            for future in futures:
                future.cancel()
            raise


class ForkedTraces:
    """The fork server back end: the setups shared over children forked from ``server``
    (whose caller had it preload the tracer, ``trace``), their stderr appended to
    ``log_path``. Raises ForkServerError when the server cannot fork them."""

    def __init__(self, server: ForkServer, log_path: Path, allocator_conf: str | None = None) -> None:
        self.server = server
        self.log_path = log_path
        self.allocator_conf = allocator_conf

    def ready(self) -> bool:
        """Whether the server runs (started now if it was not); False when it cannot serve."""
        return self.server.start()

    def describe_target(self, config: BenchConfig) -> tuple[str, str | None]:
        """``trace.describe_target`` asked of a child, so that the caller never imports the tracer's stack."""
        with self.log_path.open("a", encoding="utf-8") as log:
            described = json.loads(self.server.output(describe_target_in_child, [json.dumps(to_dict(config))], log.fileno()))
        return described["label"], described["caveat"]

    def trace(self, setups: list[Setup], config: BenchConfig, jobs: int, limit: int | None,
              on_done: Callable[[Prediction], None], extrapolate: bool = False) -> None:
        # Each child prepares the trace inputs once (the run has left the tokenised data in the
        # cache) and traces its share in turn, as a pool process would.
        config_text = json.dumps(to_dict(config))
        shares = _shares(setups, config, jobs)
        threads = ["--single-threaded"] if len(shares) > 1 else []
        done: dict[Setup, Prediction] = {}
        failures: list[dict[str, Any]] = []
        children = []
        pending: dict[int, bytes] = {}  # each child's stdout, and what it wrote past its last full line
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log, selectors.DefaultSelector() as selector:
            try:
                for share in shares:
                    read, write = os.pipe()
                    try:
                        argv = [config_text, json.dumps([[setup.cell, setup.micro_batch_size, setup.world_size]
                                                         for setup in share]),
                                json.dumps(limit), json.dumps(self.allocator_conf), json.dumps(extrapolate), *threads]
                        children.append(self.server.spawn(trace_share, argv, write, log.fileno()))
                    except BaseException:
                        os.close(read)
                        raise
                    finally:
                        os.close(write)
                    pending[read] = b""
                    selector.register(read, selectors.EVENT_READ)
                while pending:
                    for key, _ in selector.select():
                        fd = key.fd
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            selector.unregister(fd)
                            os.close(fd)
                            del pending[fd]
                            continue
                        *lines, pending[fd] = (pending[fd] + chunk).split(b"\n")
                        for line in lines:
                            message = json.loads(line)
                            if "failed" in message:
                                failures.append(message)
                                continue
                            prediction = Prediction.from_dict(message)
                            done[prediction.setup] = prediction
                            on_done(prediction)
            finally:
                for fd in pending:
                    os.close(fd)
                for child in children:
                    child.terminate()  # only one still tracing: after Ctrl-C or an error here
                    child.wait()
        if failures:
            reason = failures[0]["failed"]
            raise UserError(reason) if failures[0]["user_error"] else RuntimeError(reason)
        missing = [setup.label for setup in setups if setup not in done]
        if missing:
            codes = ", ".join(str(child.returncode) for child in children)
            raise RuntimeError(f"trace processes ended without tracing {', '.join(missing)} (exit codes {codes}); see {self.log_path}")


class TracePool:
    """The trace pool: setups traced in processes that live as long as it does, on one of two
    back ends. Spawned (the default): ``fit`` asks for traces a few at a time, and a fresh
    pool each time would import torch and transformers again (~5 s a process) and re-read
    the tokenised data. Forked (``forked``): children of a run's fork server, which import
    nothing; when the server cannot fork, the spawned back end takes the traces over."""

    def __init__(self, jobs: int = 1, forked: ForkedTraces | None = None, allocator_conf: str | None = None) -> None:
        self.jobs = jobs
        self.forked = forked
        if forked is not None:
            forked.allocator_conf = allocator_conf
        self.allocator_conf = allocator_conf
        self.spawned = SpawnedTraces(jobs, allocator_conf)

    def __enter__(self) -> "TracePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.spawned.close()

    def describe_target(self, config: BenchConfig) -> tuple[str, str | None]:
        """What an estimate's header says about the traces (``trace.describe_target``)."""
        if self.forked is not None and self.forked.ready():
            try:
                return self.forked.describe_target(config)
            except (ForkServerError, ValueError, KeyError):
                pass  # described here instead
        return describe_target(config)

    def predict(
        self,
        setups: list[Setup],
        config: BenchConfig,
        on_done: Callable[[Prediction], None] = lambda prediction: None,
        limit: int | None = None,
        extrapolate: bool = False,
    ) -> list[Prediction]:
        """Trace every setup; the result keeps the order of ``setups``. A setup that cannot be
        traced comes back with ``error`` set; a config or data problem raises. With ``limit``
        (tensor bytes on the device) a trace stops once it is passed (``Prediction.stopped``).
        ``extrapolate``: a setup on several ranks of a deep model is traced at two shallow
        depths and extrapolated to its own (``depth.py``), as fit weighs them."""
        done: dict[Setup, Prediction] = {}

        def record(prediction: Prediction) -> None:
            done[prediction.setup] = prediction
            on_done(prediction)

        if self.forked is not None and self.forked.ready():
            try:
                # Each child prepares the trace inputs itself (a run has left the tokenised data in the cache).
                self.forked.trace(setups, config, self.jobs, limit, record, extrapolate)
                return [done[setup] for setup in setups]
            except ForkServerError:
                done.clear()  # the server stopped: the spawned back end still gives the estimate
        config_data = to_dict(config)
        # Tokenise once here: the pool's processes then read the cache instead of racing to write
        # it, and a trace in this process reuses the batches.
        _cached_inputs(config_data, config)
        if self.jobs <= 1 or (len(setups) == 1 and not self.spawned.started):
            for setup in setups:
                record(Prediction.from_dict(_trace_in_worker(config_data, setup, limit, self.allocator_conf,
                                                             extrapolate)))
        else:
            self.spawned.trace(setups, config, config_data, limit, record, extrapolate)
        return [done[setup] for setup in setups]


def predict(
    setups: list[Setup],
    config: BenchConfig,
    jobs: int = 1,
    on_done: Callable[[Prediction], None] = lambda prediction: None,
    forked: ForkedTraces | None = None,
    limit: int | None = None,
    allocator_conf: str | None = None,
) -> list[Prediction]:
    """Trace every setup once, in a pool of ``min(jobs, len(setups))`` processes (see
    ``TracePool.predict``): children of a fork server with ``forked``, else spawned. The
    reserve is replayed under ``allocator_conf`` (PYTORCH_CUDA_ALLOC_CONF's text)."""
    with TracePool(min(jobs, max(1, len(setups))), forked, allocator_conf) as pool:
        return pool.predict(setups, config, on_done, limit)


# --------------------------------------------------------------------------- in the fork server's children


def _shares(setups: list[Setup], config: BenchConfig, jobs: int) -> list[list[Setup]]:
    """The setups split over ``jobs`` children, the longest traces first to the least loaded."""
    shares: list[list[Setup]] = [[] for _ in range(max(1, min(jobs, len(setups))))]
    loads = [0] * len(shares)
    for setup in sorted(setups, key=lambda setup: -_trace_cost(setup, config)):
        least = loads.index(min(loads))
        shares[least].append(setup)
        loads[least] += _trace_cost(setup, config)
    return [share for share in shares if share]


def trace_share(argv: list[str]) -> int:
    """A forked child's entry: trace the setups in ``argv[1]`` (JSON) under the config in
    ``argv[0]`` (JSON), the limit in ``argv[2]`` (JSON: bytes or null), the allocator
    conf in ``argv[3]`` (JSON: text or null) and whether to extrapolate deep ranks in
    ``argv[4]`` (JSON), printing one JSON line per prediction, or one ``failed`` line."""
    config_data = json.loads(argv[0])
    setups = [Setup(*fields) for fields in json.loads(argv[1])]
    limit = json.loads(argv[2])
    allocator_conf = json.loads(argv[3])
    extrapolate = bool(json.loads(argv[4]))
    if "--single-threaded" in argv[5:]:
        _single_threaded()
    try:
        for setup in setups:
            print(json.dumps(_trace_in_worker(config_data, setup, limit, allocator_conf, extrapolate)), flush=True)
    except Exception as error:  # noqa: BLE001 - a config or data problem: the parent raises it
        print(json.dumps({"failed": f"{type(error).__name__}: {first_line(error)}", "user_error": isinstance(error, UserError)}),
              flush=True)
        return 1
    return 0
