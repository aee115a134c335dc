"""The frame as files: CSV and JSON for other tools, and the report files beside the results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..files import atomic_write_bytes
from ..results import LoadedRun
from .frame import HIGHER_IS_BETTER, LOWER_IS_BETTER, MemoryMeasure, build_frame
from .table import markdown


def to_json(frame: pd.DataFrame, measure: MemoryMeasure, baseline: str) -> str:
    rows = json.loads(frame.to_json(orient="records"))  # NaN becomes null
    payload = {
        "schema": "gputech-bench/report/1",
        "baseline": baseline,
        "memory_column": measure.metric,
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "higher_is_better": sorted(HIGHER_IS_BETTER),
        "rows": rows,
    }
    return json.dumps(payload, indent=2) + "\n"


def to_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


#: What ``render`` writes; the terminal table is the command line's (``cli.tables``).
FORMATS = ("md", "csv", "json", "html")


def render(run: LoadedRun, fmt: str, baseline: str = "baseline") -> str:
    frame, measure = build_frame(run.results, baseline)
    return _render(run, frame, measure, fmt, baseline)


def _render(run: LoadedRun, frame: pd.DataFrame, measure: MemoryMeasure, fmt: str, baseline: str) -> str:
    if fmt == "md":
        return markdown(frame, measure, run.results, baseline)
    if fmt == "csv":
        return to_csv(frame)
    if fmt == "json":
        return to_json(frame, measure, baseline)
    if fmt == "html":
        from .html import html_report

        return html_report(run, frame, measure, baseline)
    raise ValueError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")


def write_exports(run: LoadedRun, baseline: str = "baseline") -> list[Path]:
    """report.md, report.csv and report.json beside the results."""
    frame, measure = build_frame(run.results, baseline)
    written = []
    for fmt, extension in (("md", "md"), ("csv", "csv"), ("json", "json")):
        path = run.root / f"report.{extension}"
        text = _render(run, frame, measure, fmt, baseline)
        atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)
    return written
