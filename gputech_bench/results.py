"""The contract between the two halves: what a worker writes and every reader reads.

In: figures measured by a worker (``worker/cell.py``), merged by the runner
(``merge_repeats``, ``merge_ranks``). Out: one JSON file per cell in a run folder, and the
same ``CellResult`` back for the report, the estimate and ``compare``.

``Figure`` is one measured value with its unit and the method that measured it.
``CellResult`` is one cell's result; ``to_dict``/``from_dict`` keep the JSON schema that
result files have always had, so old run folders still load. ``RunFolder`` owns every
file name in a run folder: nothing else spells them.

Import-light on purpose (no torch): the worker writes a result even when torch fails to import.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from .config import REFERENCE_MATRIX
from .errors import ResultError
from .files import write_json
from .metrics import RankMerge, merged_as
from .stats import Summary, summarize

SCHEMA = "gputech-bench/cell-result/1"
STATUSES = ("ok", "eval-oom", "oom", "error", "timeout", "crashed", "interrupted")
#: Statuses whose training figures (memory, time, loss) stand: eval-oom trained to the
#: end and only its evaluation ran out of memory.
TRAINED_STATUSES = ("ok", "eval-oom")
#: What a result written before ``data.objective`` existed was trained on.
OBJECTIVE_BEFORE_THE_SETTING = "mlm"
#: Per-process memory figures: a torchrun cell's are merged as max / mean / total over ranks.
MEMORY_METRICS = tuple(metric.name for metric in merged_as(RankMerge.LARGEST))
#: Figures that are the lowest rank's and already count the samples of every rank.
ALL_SAMPLES_METRICS = tuple(metric.name for metric in merged_as(RankMerge.LOWEST_RANK_ALL_SAMPLES))
#: Which failure explains a cell when several ranks or repeats failed: the cause before its
#: echoes (a rank that ran out of memory makes torchrun stop the others, which then read "interrupted").
STATUS_PRECEDENCE = ("oom", "eval-oom", "error", "timeout", "crashed", "interrupted")


# --------------------------------------------------------------------------- one figure


@dataclass(frozen=True)
class Figure:
    """A measured value, its unit, and how it was measured."""

    value: Any
    unit: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "method": self.method}

    @classmethod
    def from_dict(cls, data: Any) -> Figure:
        if not isinstance(data, dict):
            return cls(None, "", "")
        return cls(data.get("value"), str(data.get("unit", "")), str(data.get("method", "")))

    @property
    def number(self) -> float | None:
        """The value when it is a number (not a flag, not missing)."""
        value = self.value
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- one cell


@dataclass
class CellResult:
    """One cell's result. Filled in place by the worker as figures are measured, so a
    failure late in the cell still leaves everything measured before it."""

    cell: str
    status: str = "error"
    reason: str | None = "the cell did not finish"
    strategies: list[str] | None = None
    preset: str | None = None
    config: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    rank: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    strategy_facts: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    memory_cap: dict[str, Any] | None = None
    #: The CUDA caching allocator's setting in the cell's process (``measure.allocator.recorded_setting``):
    #: ``conf`` (PYTORCH_CUDA_ALLOC_CONF, None when unset), ``option`` (run --allocator) and
    #: ``inherited``. None in a result written before it was recorded.
    allocator: dict[str, Any] | None = None
    metrics: dict[str, Figure] = field(default_factory=dict)
    memory_breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    oom: dict[str, Any] | None = None
    memory_snapshot: str | None = None
    notes: list[str] = field(default_factory=list)
    traceback: list[str] | None = None
    repeat: int | None = None
    repeats: dict[str, Any] | None = None
    distributed: dict[str, Any] | None = None
    memory_per_rank: dict[str, Any] | None = None
    ranks: list[dict[str, Any]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Keys this version does not know (a newer writer's), kept so that nothing is lost.
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- figures

    def record(self, name: str, value: Any, unit: str, method: str) -> None:
        self.metrics[name] = Figure(value, unit, method)

    def value(self, name: str) -> Any:
        """The value of figure ``name``, or None when it was not measured."""
        entry = self.metrics.get(name)
        return None if entry is None else entry.value

    def number(self, name: str) -> float | None:
        """The value of figure ``name`` when it is a number."""
        entry = self.metrics.get(name)
        return None if entry is None else entry.number

    def method(self, name: str) -> str:
        entry = self.metrics.get(name)
        return "" if entry is None else entry.method

    def statistics(self, name: str) -> Summary | None:
        """The repeats' statistics of figure ``name`` (``run --repeat``), or None for a single run."""
        data = (self.repeats or {}).get("statistics", {}).get(name)
        return Summary.from_dict(data) if data else None

    # ---- what the cell ran under

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def trained(self) -> bool:
        """Whether its training figures stand (ok, or only its evaluation failed)."""
        return self.status in TRAINED_STATUSES

    @property
    def device_type(self) -> str | None:
        return (self.device or {}).get("type")

    @property
    def objective(self) -> str | None:
        """The training objective; None for a result that never got as far as a config."""
        if not isinstance(self.config, dict):
            return None
        return self.config.get("data", {}).get("objective", OBJECTIVE_BEFORE_THE_SETTING)

    @property
    def attention(self) -> str | None:
        """The attention implementation the cell's model ran (eager, sdpa)."""
        attention = (self.model or {}).get("attention")
        if attention:
            return attention
        return self.config.get("model", {}).get("attention") if isinstance(self.config, dict) else None

    @property
    def recorded_snapshot(self) -> bool:
        """Whether the cell recorded a CUDA memory snapshot, which slows its steps."""
        return bool(self.memory_snapshot or (self.config or {}).get("memory_snapshot"))

    # ---- JSON

    def to_dict(self) -> dict[str, Any]:
        """The result file's JSON object; optional parts that were never set are left out."""
        data: dict[str, Any] = {"schema": SCHEMA}
        for item in fields(self):
            if item.name == "extra":
                continue
            value = getattr(self, item.name)
            if item.name == "metrics":
                value = {name: entry.to_dict() for name, entry in value.items()}
            elif value is None and item.name not in ("reason",):
                continue
            data[item.name] = value
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "result") -> CellResult:
        """A result from its JSON object; refuses what is not a gputech-bench cell result."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("status") not in STATUSES:
            raise ResultError(f"{source}: not a gputech-bench cell result; move it out of the results folder")
        known = {item.name for item in fields(cls)} - {"extra"}
        values = {name: copy.deepcopy(value) for name, value in data.items() if name in known}
        values["metrics"] = {name: Figure.from_dict(entry) for name, entry in (data.get("metrics") or {}).items()}
        extra = {name: value for name, value in data.items() if name not in known and name != "schema"}
        return cls(**values, extra=extra)

    @classmethod
    def failed(cls, cell: str, status: str, reason: str | None) -> CellResult:
        """What is known when a cell failed before measuring anything."""
        return cls(cell, status, reason)


def write_result(path: Path, result: CellResult) -> Path:
    """Write a result as JSON through a temporary file and a rename."""
    return write_json(path, result.to_dict())


def read_result(path: Path) -> CellResult:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultError(f"{path}: not a readable JSON result ({type(error).__name__}); delete it or re-run its cell") from None
    return CellResult.from_dict(data, source=str(path))


# --------------------------------------------------------------------------- merging


def _precedence(status: str) -> int:
    return STATUS_PRECEDENCE.index(status) if status in STATUS_PRECEDENCE else 0


def _rank(result: CellResult) -> int:
    """The rank that wrote ``result``: every result a torchrun rank writes says which it is."""
    assert result.rank is not None, f"{result.cell}: a rank's result without its rank"
    return result.rank["rank"]


def merge_ranks(results: list[CellResult], distributed: dict[str, Any]) -> CellResult:
    """One cell's result from its ranks' (``--nproc-per-node``): the lowest rank's figures,
    with memory the largest rank's (what must fit on each GPU) and the mean and total beside it.

    Time and accuracy come from the lowest rank: ranks step in lockstep, and every rank
    evaluates the whole eval set. ``distributed`` describes the launch (world size, nodes)."""
    lead = min(results, key=_rank)
    merged = copy.deepcopy(lead)
    merged.rank = None
    failed = [result for result in results if not result.ok]
    merged.status, merged.reason = "ok", None
    if failed:
        first = min(failed, key=lambda result: (_precedence(result.status), _rank(result)))
        merged.status, merged.reason = first.status, f"rank {_rank(first)}: {first.reason}"
    ranks = [_rank(result) for result in results]
    per_rank: dict[str, Any] = {}
    for metric in MEMORY_METRICS:
        values = [result.number(metric) for result in results]
        known = [value for value in values if value is not None]
        if not known:
            continue
        per_rank[metric] = {
            "max": max(known), "mean": round(sum(known) / len(known), 3), "total": round(sum(known), 3),
            "by_rank": dict(zip(map(str, ranks), values)),
        }
        merged.record(metric, max(known), "MiB",
                      f"{lead.method(metric)}; the largest of {len(known)} rank(s) (mean and total in memory_per_rank)")
    merged.memory_per_rank = per_rank
    for name in ALL_SAMPLES_METRICS:
        throughput = merged.metrics.get(name)
        if throughput:  # each rank walks every batch and takes its share: the epoch's samples are all ranks'
            merged.record(name, throughput.value, throughput.unit,
                          f"{throughput.method}; the samples of all {distributed['world_size']} ranks")
    merged.distributed = {**distributed, "ranks_on_this_node": ranks, "launcher": "torch.distributed.run"}
    merged.ranks = [
        {"rank": _rank(result), "status": result.status, "reason": result.reason,
         "metrics": {m: result.number(m) for m in MEMORY_METRICS if result.number(m) is not None}}
        for result in results
    ]
    return merged


def merge_repeats(cell: str, runs: list[CellResult], planned: int, seeds: list[int | None]) -> CellResult:
    """One cell's result from its repeats (``run --repeat N``) so far, in order, of ``planned``.

    Every numeric figure becomes the median of the ok repeats, so the table, the exports and
    the estimate read it like a single run; each figure's statistics (median, range, MAD,
    outliers, every value) go under ``repeats``."""
    ok = [run for run in runs if run.ok]
    merged = copy.deepcopy(ok[0] if ok else runs[0])
    merged.cell, merged.repeat = cell, None
    failed = [(f"repeat {index} of {planned}", run) for index, run in enumerate(runs, start=1) if not run.ok]
    if failed:
        merged.status, merged.reason = failed[0][1].status, f"{failed[0][0]}: {failed[0][1].reason}"
    elif len(runs) < planned:
        merged.status = "interrupted"
        merged.reason = f"{len(runs)} of {planned} repeats done; re-run with the same --run-name to finish"
    else:
        merged.status, merged.reason = "ok", None

    statistics: dict[str, Any] = {}
    for name, entry in list(merged.metrics.items()):
        values = [run.number(name) for run in ok]
        known = [value for value in values if value is not None]
        summary = summarize(known) if len(known) == len(values) else None
        if summary is None:
            continue
        statistics[name] = summary.to_dict()
        merged.record(name, summary.median, entry.unit, f"{entry.method}; median of {summary.n} repeats")
    merged.repeats = {
        "count": planned,
        "done": len(runs),
        "ok": len(ok),
        "seeds": seeds[: len(runs)],
        "vary_seed": len(set(seeds)) > 1,
        "statuses": [run.status for run in runs],
        "statistics": statistics,
    }
    return merged


# --------------------------------------------------------------------------- the run folder


def cell_order(cell: str) -> tuple[int, str]:
    """The seed's table order, then the others by name."""
    return (REFERENCE_MATRIX.index(cell), "") if cell in REFERENCE_MATRIX else (len(REFERENCE_MATRIX), cell)


@dataclass
class LoadedRun:
    """A run folder's cell results, in the seed's order, and its resolved config."""

    folder: RunFolder
    results: list[CellResult]
    #: One line per file that was named and skipped.
    problems: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None

    @property
    def root(self) -> Path:
        return self.folder.root

    def by_cell(self) -> dict[str, CellResult]:
        return {result.cell: result for result in self.results}


@dataclass(frozen=True)
class RunFolder:
    """Every file of a run folder, by name: the one place that spells them.

    ``RUN/config.json`` the resolved config; ``RUN/CELL.json`` a cell's result;
    ``RUN/repeats/CELL.repK.json`` a repeat's; ``RUN/ranks/CELL.rankR.json`` a rank's;
    ``RUN/logs/`` the workers' logs (and the fork server's and the estimate's); ``RUN/previous/`` earlier attempts;
    ``RUN/report.{md,csv,json,html}``; ``RUN/estimate.json``; ``RUN/CELL.snapshot.pickle``.

    A run split over machines (``run --shard K/N``) adds ``RUN/shards.json``, the split every
    shard agrees on; a shard's folder (``shard`` set, e.g. ``"2-of-3"``) writes its estimate to
    ``RUN/shards/estimate.2-of-3.json`` and its fork server's and estimate's logs to
    ``RUN/logs/fork-server.2-of-3.log`` and ``RUN/logs/estimate.2-of-3.log``, so that shards
    running at the same time never write the same file.
    """

    root: Path
    #: This shard's tag (``run.shard.Shard.tag``), or None for a run that is not split.
    shard: str | None = None

    CONFIG = "config.json"
    ESTIMATE = "estimate.json"
    REPORT = "report"
    REPEATS = "repeats"
    RANKS = "ranks"
    SHARD_PLAN = "shards.json"
    SHARDS = "shards"
    #: JSON files beside the cell results that are not cell results.
    NOT_RESULTS = frozenset({CONFIG, ESTIMATE, f"{REPORT}.json", SHARD_PLAN})

    @property
    def config_path(self) -> Path:
        return self.root / self.CONFIG

    @property
    def estimate_path(self) -> Path:
        """The run's estimate; a shard's own, of its cells, when ``shard`` is set."""
        if self.shard:
            return self.root / self.SHARDS / f"estimate.{self.shard}.json"
        return self.root / self.ESTIMATE

    @property
    def shard_plan_path(self) -> Path:
        """How a run split over machines was split (``run --shard``)."""
        return self.root / self.SHARD_PLAN

    def shard_estimate_paths(self) -> list[Path]:
        """Every shard's estimate file, in name order."""
        return sorted((self.root / self.SHARDS).glob("estimate.*.json"))

    def for_shard(self, shard: str | None) -> RunFolder:
        """The same folder as shard ``shard`` writes it."""
        return RunFolder(self.root, shard)

    def _shard_suffix(self) -> str:
        return f".{self.shard}" if self.shard else ""

    def result_path(self, cell: str) -> Path:
        return self.root / f"{cell}.json"

    def repeat_path(self, label: str) -> Path:
        """A repeat's own result (``label`` as the runner names it, e.g. ``1+2.rep3``)."""
        return self.root / self.REPEATS / f"{label}.json"

    def rank_path(self, label: str, rank: int) -> Path:
        """Where rank ``rank`` of the cell (or repeat) ``label`` writes its own result."""
        return self.root / self.RANKS / f"{label}.rank{rank}.json"

    def rank_paths(self, label: str) -> Iterator[Path]:
        return (self.root / self.RANKS).glob(f"{label}.rank*.json")

    def log_path(self, label: str) -> Path:
        return self.root / "logs" / f"{label}.log"

    @property
    def fork_server_log_path(self) -> Path:
        """The fork server's own log (its preload); each cell's output is in the cell's log."""
        return self.root / "logs" / f"fork-server{self._shard_suffix()}.log"

    @property
    def estimate_log_path(self) -> Path:
        """The post-run estimate's trace processes' output."""
        return self.root / "logs" / f"estimate{self._shard_suffix()}.log"

    def previous_path(self, cell: str) -> Path:
        return self.root / "previous" / f"{cell}.json"

    def report_path(self, extension: str) -> Path:
        return self.root / f"{self.REPORT}.{extension}"

    def snapshot_path(self, label: str) -> Path:
        return self.root / f"{label}.snapshot.pickle"

    def read_config(self) -> dict[str, Any] | None:
        """The resolved config the run was made with, or None when it is missing or unreadable."""
        try:
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return config if isinstance(config, dict) else None

    def result_paths(self) -> list[Path]:
        return [path for path in sorted(self.root.glob("*.json")) if path.name not in self.NOT_RESULTS]

    def result_stamps(self) -> tuple[tuple[str, int, int], ...]:
        """Each result file's name, modification time and size: changes when any result is written."""
        stamps = []
        for path in self.result_paths():
            try:
                stat = path.stat()
            except FileNotFoundError:  # moved to previous/ as a cell starts again
                continue
            stamps.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def load(self) -> LoadedRun:
        """Every cell result of the folder; unreadable or foreign files are named and skipped."""
        if not self.root.is_dir():
            raise ResultError(
                f"'{self.root}' is not a run folder: pass a folder made by 'gputech-bench run' (e.g. results/NAME)"
            )
        run = LoadedRun(self, [], config=self.read_config())
        for path in self.result_paths():
            try:
                run.results.append(read_result(path))
            except ResultError as error:
                run.problems.append(f"skipped {error}")
        if not run.results:
            raise ResultError(
                f"no cell results in '{self.root}': run 'gputech-bench run --results {self.root.parent} "
                f"--run-name {self.root.name}' first"
            )
        run.results.sort(key=lambda result: cell_order(result.cell))
        return run


def load_run(root: Path) -> LoadedRun:
    """The cell results of the run folder ``root``."""
    return RunFolder(Path(root)).load()
