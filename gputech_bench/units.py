"""Units: bytes to MiB and GiB, memory sizes as people write them, and missing numbers."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import SizeError

KIB = 2**10
MIB = 2**20
GIB = 2**30
TIB = 2**40
#: For figures already in MiB (result files store MiB) shown in GiB.
MIB_PER_GIB = GIB // MIB

# Binary units for the forms GPU tools print (GiB, MiB, and the bare G/M shorthand);
# decimal units only where the SI prefix says so (GB, MB), as disk vendors use them.
UNITS = {
    "b": 1,
    "kib": KIB, "k": KIB, "kb": 10**3,
    "mib": MIB, "m": MIB, "mb": 10**6,
    "gib": GIB, "g": GIB, "gb": 10**9,
    "tib": TIB, "t": TIB, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def to_mib(num_bytes: float) -> float:
    """MiB, rounded to the byte's neighbourhood (3 decimals) so that result files stay readable."""
    return round(num_bytes / MIB, 3)


def parse_size(text: str) -> int:
    """Bytes in ``text``; a bare number is GiB, the unit people size GPUs in."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in UNITS):
        raise SizeError(f"cannot read memory size '{text}': write it like 24GiB, 24GB, 24G or 512MiB")
    value = float(match.group(1)) * (UNITS[unit] if unit else GIB)
    if value <= 0:
        raise SizeError(f"memory size '{text}' must be more than zero")
    return int(value)


def format_gib(num_bytes: float) -> str:
    """Bytes as GiB with one decimal: '23.6 GiB'."""
    return f"{num_bytes / GIB:.1f} GiB"


def format_size(num_bytes: float) -> str:
    """Bytes in the unit that shows them: '26.00 GiB' from 1 GiB up, else '3.35 MiB' (a small
    model's figure never reads as 0.00 GiB)."""
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / MIB:.2f} MiB"


def is_missing(value: Any) -> bool:
    """No figure: None, or the NaN that pandas and JSON's null become."""
    return value is None or (isinstance(value, float) and math.isnan(value))
