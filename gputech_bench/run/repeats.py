"""One cell's result from its repeats (``run --repeat N``).

Each repeat is a complete run of the cell in a fresh process, written to its own file
under ``repeats/``. The cell's result carries the median of every numeric figure, so
the table, the exports and the estimate read it like a single run, and the statistics
of each figure (median, range, MAD, outliers, every value) under ``repeats``.
"""

from __future__ import annotations

import copy
from typing import Any

from ..stats import summarize


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(cell: str, runs: list[dict[str, Any]], planned: int, seeds: list[int | None]) -> dict[str, Any]:
    """The cell's result from ``runs`` (its repeats so far, in order) of ``planned``."""
    ok = [run for run in runs if run["status"] == "ok"]
    merged = copy.deepcopy(ok[0] if ok else runs[0])
    merged["cell"] = cell
    merged.pop("repeat", None)
    failed = [(index, run) for index, run in enumerate(runs, start=1) if run["status"] != "ok"]
    if failed:
        index, run = failed[0]
        merged["status"], merged["reason"] = run["status"], f"repeat {index} of {planned}: {run.get('reason')}"
    elif len(runs) < planned:
        merged["status"] = "interrupted"
        merged["reason"] = f"{len(runs)} of {planned} repeats done; re-run with the same --run-name to finish"
    else:
        merged["status"], merged["reason"] = "ok", None

    statistics: dict[str, Any] = {}
    for name, entry in merged.get("metrics", {}).items():
        values = [run["metrics"].get(name, {}).get("value") for run in ok]
        if not values or not all(_numeric(value) for value in values):
            continue
        summary = summarize(values)
        statistics[name] = summary.to_dict()
        entry["value"] = summary.median
        entry["method"] = f"{entry.get('method', '')}; median of {summary.n} repeats"
    merged["repeats"] = {
        "count": planned,
        "done": len(runs),
        "ok": len(ok),
        "seeds": seeds[: len(runs)],
        "vary_seed": len(set(seeds)) > 1,
        "statuses": [run["status"] for run in runs],
        "statistics": statistics,
    }
    return merged
