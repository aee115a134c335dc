"""Predict the memory of many setups: one fake trace each, in parallel processes.

A setup is a cell plus, for cells with accumulation, a micro-batch size; ``fit``
tries several of those per cell. Traces are independent and single-threaded
Python, so a pool of processes divides the wall time by the cores it gets.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..config import BenchConfig, from_dict, to_dict
from ..errors import UserError
from ..measure.tracker import TrackedPeak


@dataclass(frozen=True)
class Setup:
    """What one trace runs: a cell, and the micro-batch size when the cell accumulates."""

    cell: str
    micro_batch_size: int | None = None

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.setup.cell,
            "micro_batch_size": self.setup.micro_batch_size,
            "device": dataclasses.asdict(self.device),
            "host": None if self.host is None else dataclasses.asdict(self.host),
            "trace_seconds": round(self.trace_seconds, 3),
            "facts": self.facts,
            "error": self.error,
            "source": self.source,
            "modelled": self.modelled,
            "stopped": self.stopped,
        }

    @property
    def source(self) -> str:
        """How the figure came about, in one word: traced, modelled or untraced."""
        return "untraced" if self.error else ("modelled" if self.modelled else "traced")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Prediction":
        host = data.get("host")
        return cls(
            Setup(data["cell"], data.get("micro_batch_size")),
            TrackedPeak(**data["device"]),
            None if host is None else TrackedPeak(**host),
            float(data.get("trace_seconds", 0.0)),
            dict(data.get("facts", {})),
            data.get("error"),
            data.get("modelled"),
            bool(data.get("stopped", False)),
        )


def _uses_accumulation(cell: str) -> bool:
    from ..strategies import parse_cell

    return any(cls.key == "2" for cls in parse_cell(cell).strategies)


def setups_for(cells: Iterable[str], config: BenchConfig) -> list[Setup]:
    """The cells as ``run`` would train them: accumulation at the config's micro-batch size."""
    return [
        Setup(cell, config.strategy.micro_batch_size if _uses_accumulation(cell) else None) for cell in cells
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


def _trace_in_worker(config_data: dict[str, Any], setup: Setup, limit_bytes: int | None = None) -> dict[str, Any]:
    from ..strategies import parse_cell
    from .modelled import modeller_for
    from .trace import Limit, trace_cell, trace_inputs, trace_target

    config = setup.config_for(from_dict(config_data))
    key = _inputs_key(config_data)
    if key not in _worker_inputs:
        _worker_inputs.clear()
        _worker_inputs[key] = trace_inputs(config)
    target = trace_target()
    limit = None if limit_bytes is None else Limit(limit_bytes)
    try:
        cell = parse_cell(setup.cell)
        modeller = modeller_for(cell, target.device.type)
        if modeller is not None:
            out = modeller.run(cell, config, _worker_inputs[key], target, limit)
            return Prediction(setup, out.device, out.host, out.seconds, out.facts, None, out.method, out.stopped).to_dict()
        trace = trace_cell(cell, config, _worker_inputs[key], target, limit)
    except Exception as error:  # noqa: BLE001 - one setup the tracer cannot follow must not sink the others
        from ..errors import first_line

        reason = first_line(error) if isinstance(error, UserError) else f"{type(error).__name__}: {first_line(error)}"
        return Prediction(setup, TrackedPeak(str(target.device), 0, {}), None, 0.0, {}, reason).to_dict()
    return Prediction(setup, trace.device, trace.host, trace.seconds, trace.facts, stopped=trace.stopped).to_dict()


def default_jobs() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class Predictor:
    """Traces setups in a pool of processes that lives as long as it does: ``fit`` asks for
    traces a few at a time, and a fresh pool each time would import torch and transformers
    again (~5 s a process) and re-read the tokenised data."""

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a forked copy of a process that already imported torch can deadlock.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=context, initializer=_single_threaded)
        return self._pool

    def predict(
        self,
        setups: list[Setup],
        config: BenchConfig,
        on_done: Callable[[Prediction], None] = lambda prediction: None,
        limit: int | None = None,
    ) -> list[Prediction]:
        """Trace every setup; the result keeps the order of ``setups``. A setup that cannot be
        traced comes back with ``error`` set; a config or data problem raises. With ``limit``
        (tensor bytes on the device) a trace stops once it is passed (``Prediction.stopped``)."""
        from .trace import trace_inputs

        config_data = to_dict(config)
        # Tokenise once here: the pool's processes then read the cache instead of racing to write
        # it, and a trace in this process reuses the batches.
        key = _inputs_key(config_data)
        if key not in _worker_inputs:
            _worker_inputs.clear()
            _worker_inputs[key] = trace_inputs(config)
        done: dict[Setup, Prediction] = {}
        if self.jobs <= 1 or (len(setups) == 1 and self._pool is None):
            for setup in setups:
                done[setup] = Prediction.from_dict(_trace_in_worker(config_data, setup, limit))
                on_done(done[setup])
            return [done[setup] for setup in setups]
        pool = self._executor()
        # The longest traces first, so that no process is left with one at the end.
        ordered = sorted(setups, key=lambda setup: -_trace_cost(setup, config))
        futures = {pool.submit(_trace_in_worker, config_data, setup, limit): setup for setup in ordered}
        try:
            for future in as_completed(futures):
                prediction = Prediction.from_dict(future.result())
                done[prediction.setup] = prediction
                on_done(prediction)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [done[setup] for setup in setups]


def predict(
    setups: list[Setup],
    config: BenchConfig,
    jobs: int = 1,
    on_done: Callable[[Prediction], None] = lambda prediction: None,
    limit: int | None = None,
) -> list[Prediction]:
    """Trace every setup once, in a pool of ``min(jobs, len(setups))`` processes (see ``Predictor.predict``)."""
    with Predictor(min(jobs, max(1, len(setups)))) as predictor:
        return predictor.predict(setups, config, on_done, limit)
