"""``estimate``: predicted memory per cell (``fit``, in _fit.py, shares its run-folder helpers).

It traces one training step of each setup on fake tensors (see ``gputech_bench/estimate``);
nothing is allocated and no GPU is needed. A setup the tracer cannot follow is a row that
says why, never an exception.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Sequence, Union

from ..config import BenchConfig, from_dict, model_overrides
from ..errors import ConfigError
from ..estimator.measured import measured_peak
from ..estimator.overheads import DEFAULTS, calibrate
from ..results import CellResult, RunFolder
from ..units import parse_size
from ._display import text_html
from ._output import Output, output_or_default
from ._progress import trace_progress
from ._setup import Overrides, Selection, cuda_available, strategies_text

if TYPE_CHECKING:
    import pandas as pd

    from ..estimator.predict import ForkedTraces
    from ..estimator.render import EstimateReport

PathLike = Union[str, Path]


class RunLike(Protocol):
    """A :class:`~gputech_bench.api.Run` as the estimate sees it: its folder (not imported
    here, since _run.py imports this module for the estimate after a run)."""

    @property
    def path(self) -> Path: ...


# --------------------------------------------------------------------------- tracing


def build_estimate(
    config: BenchConfig, cells: list[str], jobs: int, budget: Optional[int], results: Optional[list[CellResult]],
    output: Output | None = None, *, forked: "ForkedTraces | None" = None, world_size: Optional[int] = None,
) -> "EstimateReport":
    """Trace ``cells`` in a pool of ``jobs`` processes and assemble the report; with ``output``,
    a progress bar on its console while they trace. Shared by ``estimate`` and ``run_matrix``
    (which passes ``forked``, its fork server's back end: children that trace without
    importing anything). ``world_size``: the ranks each cell runs on, each traced as rank 0 of
    them (default: the measured run's, else 1)."""
    from ..estimator.predict import TracePool, setups_for
    from ..estimator.render import EstimateReport

    if world_size is None:
        world_size = run_world_size(results)
    setups = setups_for(cells, config, world_size)
    with TracePool(min(jobs, max(1, len(setups))), forked, allocator_conf(results)) as pool:
        label, caveat = pool.describe_target(config)
        if output is None:
            predictions = pool.predict(setups, config)
        else:
            with trace_progress(output.console) as progress:
                task = progress.add_task("tracing on fake tensors", total=len(setups))
                predictions = pool.predict(setups, config, on_done=lambda prediction: progress.advance(task))
    overheads = calibrate(results) if results else DEFAULTS
    measured = {}
    if results is not None:
        by_cell = {result.cell: result for result in results}
        measured = {cell: measured_peak(by_cell.get(cell)) for cell in cells}
    return EstimateReport(label, caveat, predictions, overheads, budget, measured, config.data.objective,
                          config.model.attention, model_overrides(config.model), world_size)


def run_world_size(results: Optional[list[CellResult]]) -> int:
    """The ranks a measured run's cells ran on (its merged results say), else 1."""
    for result in results or []:
        if result.distributed and result.distributed.get("world_size"):
            return int(result.distributed["world_size"])
    return 1


def world_size_of(nproc_per_node: int, nnodes: int) -> int:
    """``--nproc-per-node`` x ``--nnodes``, each checked to be a positive whole number (one error line)."""
    for option, value in (("--nproc-per-node", nproc_per_node), ("--nnodes", nnodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} {value!r}: pass a positive whole number of ranks (1 or more)")
    return nproc_per_node * nnodes


def allocator_conf(results: Optional[list[CellResult]]) -> Optional[str]:
    """The PYTORCH_CUDA_ALLOC_CONF the reserve is replayed under: what a measured run's cells
    ran with (``run --allocator`` included), else this process's environment, which a run
    started from it would inherit."""
    for result in results or []:
        if result.allocator:
            return result.allocator.get("conf")
    # The variable's name, not measure.allocator's constant: importing the measure package
    # would load torch on every front end's start-up.
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or None


def _run_config(run_dir: Path) -> tuple[BenchConfig, list[CellResult]]:
    """A measured run's config and results, for ``estimate(compare=...)`` and ``fit(from_run=...)``."""
    folder = RunFolder(Path(run_dir))
    if not folder.config_path.is_file():
        raise ConfigError(f"'{run_dir}' holds no {folder.CONFIG}: pass a folder made by 'gputech-bench run'")
    saved = folder.read_config()
    if saved is None:
        raise ConfigError(f"{folder.config_path} is unreadable: re-run the cells into a new --run-name")
    return from_dict(saved), folder.load().results


def _run_path(run: "PathLike | RunLike") -> Path:
    return Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.path)


def _device_memory(option: Optional[str]) -> Optional[int]:
    if option:
        return parse_size(option)
    if cuda_available():
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def _jobs(jobs: int) -> int:
    from ..estimator.predict import default_jobs

    if jobs < 0:
        raise ConfigError(f"--jobs {jobs}: pass 0 (one per core, up to 4) or a positive number")
    return jobs or default_jobs()


# --------------------------------------------------------------------------- estimate


class Estimate:
    """Predicted peak memory per cell: what ``estimate()`` returns.

    ``frame`` has a row per traced setup: memory by category (MiB), the tensor peak, the
    allocator reserve and CUDA context added to it, the device total, the host side, whether
    it fits the budget, and, against a measured run, the measured peak and the error in %.
    A setup the tracer could not follow has its reason in ``error`` and no figures.

    Example::

        >>> from gputech_bench import estimate
        >>> est = estimate(strategies=["1", "1+2+3"], preset="seed", device_memory="24GiB")
        >>> est.frame[["setup", "device_total_mib", "fits"]]
    """

    def __init__(self, report: "EstimateReport", config: BenchConfig) -> None:
        self.report = report
        self.config = config

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per setup; a fresh copy each time, so changing it changes nothing here."""
        import pandas as pd

        return pd.DataFrame(self.report.rows())

    @property
    def failed(self) -> list[str]:
        """The setups the tracer could not follow (each row's ``error`` says why)."""
        return [prediction.setup.label for prediction in self.report.predictions if prediction.error]

    def legend(self) -> list[str]:
        """The lines under the table: what was traced, the overheads, and why a setup was not traced."""
        from ..estimator.render import legend

        return legend(self.report)

    def markdown(self) -> str:
        """The table as GitHub markdown, as ``estimate --format md`` prints it."""
        from ..estimator.render import markdown

        return markdown(self.report)

    def to_json(self) -> str:
        """Every prediction and row as JSON, as ``estimate --format json`` prints it."""
        from ..estimator.render import to_json

        return to_json(self.report)

    def _repr_html_(self) -> str:
        return text_html(str(self))

    def __str__(self) -> str:
        # The markdown table (the terminal's rich table is the command line's: cli/tables.py).
        return "\n".join([self.markdown().rstrip("\n"), *(f"  {line}" for line in self.legend())])

    def __repr__(self) -> str:
        return f"<Estimate of {len(self.report.predictions)} setup(s), preset {self.config.preset}>"


def estimate(
    strategies: Union[str, Sequence[str], None] = None,
    *,
    matrix: bool = False,
    preset: Optional[str] = None,
    overrides: Overrides = None,
    model: Optional[str] = None,
    train_file: Optional[PathLike] = None,
    device_memory: Optional[str] = None,
    compare: "PathLike | RunLike | None" = None,
    jobs: int = 0,
    progress: bool = True,
    output: Output | None = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
) -> Estimate:
    """Predict each cell's peak memory without a GPU: one training step traced on fake tensors.

    The same options as ``gputech-bench estimate``: ``strategies`` (a list such as
    ``["1", "1+2+3"]`` or the command line's ``"1,1+2+3"``; the baseline is always added) or
    ``matrix=True`` for the seed's 8 cells; ``preset``; ``overrides`` as a dict
    (``{"data.max_length": 512}``); ``model`` (only its config.json is read); ``train_file``;
    ``device_memory`` to judge what fits (``"24GiB"``; default: this GPU's, if any);
    ``compare``, a run folder or :class:`Run`, to use its config and put each prediction beside
    the measured peak; ``jobs`` trace processes (0: one per core, up to 4). ``nproc_per_node``
    and ``nnodes``: the ranks each cell would run on (``run``'s options); with more than one
    (or with ``fsdp``) each cell is traced as rank 0 of them, in a fake process group, and the
    table is per rank (``--compare`` takes the run's own world size).

    A setup the tracer cannot follow is a row with its reason (``Estimate.failed``), never an
    exception; bad input raises :class:`UserError` (one line).

    Example::

        >>> from gputech_bench import estimate
        >>> est = estimate(matrix=True, preset="seed", device_memory="24GiB")
        >>> est                 # in a notebook: the table the command prints
        >>> est.frame           # a pandas DataFrame, one row per setup
    """
    output = output_or_default(output)
    world_size = world_size_of(nproc_per_node, nnodes)
    # The cells' names are checked first, before the preset is resolved and named.
    selection = Selection(strategies_text(strategies), matrix, preset, overrides, model, Path(train_file) if train_file else None,
                          None, "auto")
    results = None
    if compare is not None:
        if preset or overrides or model or train_file:
            raise ConfigError("--compare uses the run's own config: drop --preset, --set, --model and --train-file")
        config, results = _run_config(_run_path(compare))
        measured_world = run_world_size(results)
        if world_size > 1 and world_size != measured_world:
            raise ConfigError(f"--compare: the run's cells ran on {measured_world} rank(s), not {world_size}: "
                              "drop --nproc-per-node and --nnodes (the run's own are taken)")
        world_size = measured_world
        chosen = [result.cell for result in results]
        cells = selection.cells(config) if selection.names_cells else chosen
    else:
        config = selection.config(output)
        cells = selection.cells(config)
    budget = _device_memory(device_memory)
    if not cells:
        raise ConfigError(f"'{compare}' holds no cell results: run some cells first, or pass --strategies")
    report = build_estimate(config, cells, _jobs(jobs), budget, results, output if progress else None,
                            world_size=world_size)
    return Estimate(report, config)


__all__ = ["Estimate", "build_estimate", "estimate"]
