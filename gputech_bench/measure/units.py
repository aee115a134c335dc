"""A measured figure with its unit and how it was obtained."""

from __future__ import annotations

from typing import Any

MIB = 1024 * 1024


def figure(value: Any, unit: str, method: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "method": method}


def to_mib(num_bytes: float) -> float:
    return round(num_bytes / MIB, 3)
