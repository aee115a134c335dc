"""One cell's result from the results of its ranks (``--nproc-per-node``).

Every rank of a torchrun launch writes its own result file under ``ranks/``; the runner
merges them into the cell's one result. Memory is per process, so the headline figure
is the largest rank's (what must fit on each GPU), with the mean and the total beside
it. Time and accuracy come from the lowest rank: ranks step in lockstep, every rank
evaluates the whole eval set, and samples/s already counts the samples of all ranks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import ResultError
from ..results import bare_result, read_result
from ..units import figure
from .launch import Launch

RANKS_FOLDER = "ranks"
#: Per-process memory figures, merged as max / mean / total over ranks.
MEMORY_METRICS = (
    "peak_allocated_mib",
    "peak_reserved_mib",
    "nvml_process_peak_mib",
    "tracked_peak_mib",
    "tracked_host_peak_mib",
    "peak_rss_mib",
)
#: Which failure explains a cell when several ranks failed: the cause before its echoes
#: (a rank that ran out of memory makes torchrun stop the others, which then read "interrupted").
STATUS_PRECEDENCE = ("oom", "error", "timeout", "crashed", "interrupted")


def rank_result_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of the cell whose result is ``out`` writes its own result."""
    return out.parent / RANKS_FOLDER / f"{out.stem}.rank{rank}.json"


def expected_ranks(launch: Launch) -> list[int]:
    """The global ranks this node runs (torchrun numbers them node by node)."""
    first = launch.node_rank * launch.nproc_per_node
    return list(range(first, first + launch.nproc_per_node))


def clear_rank_results(out: Path) -> None:
    """Remove an earlier attempt's rank files, so that a merge reads this attempt's only."""
    for path in (out.parent / RANKS_FOLDER).glob(f"{out.stem}.rank*.json"):
        path.unlink(missing_ok=True)


def read_rank_results(out: Path, launch: Launch) -> list[dict[str, Any]]:
    """This node's rank results; a rank that left none becomes a ``crashed`` row of its own."""
    results = []
    for rank in expected_ranks(launch):
        path = rank_result_path(out, rank)
        try:
            result = read_result(path)
        except ResultError:
            result = bare_result(out.stem, "crashed", f"left no result ({path.name}); see the cell's log")
        result.setdefault("rank", {"rank": rank, "world_size": launch.world_size})
        results.append(result)
    return results


def _status_and_reason(results: list[dict[str, Any]]) -> tuple[str, str | None]:
    failed = [r for r in results if r["status"] != "ok"]
    if not failed:
        return "ok", None
    first = min(failed, key=lambda r: (STATUS_PRECEDENCE.index(r["status"]) if r["status"] in STATUS_PRECEDENCE else 0, r["rank"]["rank"]))
    return first["status"], f"rank {first['rank']['rank']}: {first.get('reason')}"


def _value(result: dict[str, Any], metric: str) -> float | None:
    value = result.get("metrics", {}).get(metric, {}).get("value")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def merge_rank_results(results: list[dict[str, Any]], launch: Launch) -> dict[str, Any]:
    """The cell's result: the lowest rank's, with memory over all ranks and each rank's own figures."""
    lead = min(results, key=lambda r: r["rank"]["rank"])
    merged = copy.deepcopy(lead)
    merged.pop("rank", None)
    merged["status"], merged["reason"] = _status_and_reason(results)
    ranks = [r["rank"]["rank"] for r in results]
    per_rank: dict[str, Any] = {}
    for metric in MEMORY_METRICS:
        values = [_value(r, metric) for r in results]
        known = [v for v in values if v is not None]
        if not known:
            continue
        per_rank[metric] = {
            "max": max(known), "mean": round(sum(known) / len(known), 3), "total": round(sum(known), 3),
            "by_rank": dict(zip(map(str, ranks), values)),
        }
        method = lead.get("metrics", {}).get(metric, {}).get("method", "")
        merged["metrics"][metric] = figure(
            max(known), "MiB", f"{method}; the largest of {len(known)} rank(s) (mean and total in memory_per_rank)"
        )
    merged["memory_per_rank"] = per_rank
    throughput = merged["metrics"].get("samples_per_second")
    if throughput:  # each rank walks every batch and takes its share: the epoch's samples are all ranks'
        throughput["method"] += f"; the samples of all {launch.world_size} ranks"
    merged["distributed"] = {
        "world_size": launch.world_size,
        "nnodes": launch.nnodes,
        "nproc_per_node": launch.nproc_per_node,
        "node_rank": launch.node_rank,
        "ranks_on_this_node": ranks,
        "launcher": "torch.distributed.run",
    }
    merged["ranks"] = [
        {"rank": r["rank"]["rank"], "status": r["status"], "reason": r.get("reason"),
         "metrics": {m: _value(r, m) for m in MEMORY_METRICS if _value(r, m) is not None}}
        for r in results
    ]
    return merged
