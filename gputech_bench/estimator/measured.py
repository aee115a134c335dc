"""Predicted against measured: which measured figure a prediction is checked against."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StrategyError
from ..results import CellResult
from ..units import MIB


@dataclass(frozen=True)
class Measured:
    """The measured peak a prediction answers to, or why there is none."""

    bytes: int | None
    what: str


def measured_peak(result: CellResult | None) -> Measured:
    if result is None:
        return Measured(None, "not run")
    if not result.ok:
        return Measured(None, result.status)
    if result.device_type == "cuda":
        value = result.number("peak_allocated_mib")
        return Measured(None if value is None else int(value * MIB), "torch.cuda.max_memory_allocated")
    # Here, not at the top: the report's readers import this module, and the strategies bring torch.
    from ..strategies import parse_cell
    from ..strategies.facts import StateLocation

    try:
        strategies = parse_cell(result.cell).strategies
    except StrategyError:  # a run made with a strategy this installation no longer registers
        return Measured(None, f"n/a: '{result.cell}' names a strategy not registered here")
    if any(cls.state_location is StateLocation.HOST or cls.moves_activations_to_host for cls in strategies):
        # On a CPU run the host copy (strategy 4's fp32 master, fsdp-offload's shards, the
        # activations offload-activations moves) and the device's share one memory; the
        # prediction keeps device and host apart, so there is nothing like to compare.
        return Measured(None, "n/a on CPU (device and host are one memory)")
    value = result.number("tracked_peak_mib")
    return Measured(None if value is None else int(value * MIB), "MemTracker peak on the CPU")


def error_percent(predicted: int, measured: Measured) -> float | None:
    if not measured.bytes:
        return None
    return 100.0 * (predicted - measured.bytes) / measured.bytes
