"""Predicted against measured: which measured figure a prediction is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..units import MIB


@dataclass(frozen=True)
class Measured:
    """The measured peak a prediction answers to, or why there is none."""

    bytes: int | None
    what: str


def measured_peak(result: dict[str, Any] | None) -> Measured:
    if result is None:
        return Measured(None, "not run")
    if result.get("status") != "ok":
        return Measured(None, f"{result.get('status')}")
    metrics = result.get("metrics", {})
    if result.get("device", {}).get("type") == "cuda":
        value = metrics.get("peak_allocated_mib", {}).get("value")
        return Measured(None if value is None else int(value * MIB), "torch.cuda.max_memory_allocated")
    if "4" in result.get("cell", "").split("+"):
        # On a CPU run the fp32 master and the half copy share one memory; the
        # prediction keeps device and host apart, so there is nothing like to compare.
        return Measured(None, "n/a on CPU (device and host are one memory)")
    value = metrics.get("tracked_peak_mib", {}).get("value")
    return Measured(None if value is None else int(value * MIB), "MemTracker peak on the CPU")


def error_percent(predicted: int, measured: Measured) -> float | None:
    if not measured.bytes:
        return None
    return 100.0 * (predicted - measured.bytes) / measured.bytes
