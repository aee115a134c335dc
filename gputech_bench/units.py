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


def format_size(num_bytes: float, decimals: int = 2) -> str:
    """Bytes in the unit that shows them: the one rule for every size the tool prints (figures,
    budgets, limits, notes and errors). GiB from 1 GiB up ('26.00 GiB'), MiB below it
    ('40.00 MiB'), so that a non-zero size never reads as 0 GiB; bytes where even MiB would."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.{decimals}f} GiB"
    if num_bytes == 0 or round(num_bytes / MIB, decimals):
        return f"{num_bytes / MIB:.{decimals}f} MiB"
    return f"{num_bytes:,.0f} bytes"


def format_gib(num_bytes: float) -> str:
    """A budget, a cap or a card's size, with one decimal ('23.6 GiB', '40.0 MiB'): format_size's rule."""
    return format_size(num_bytes, decimals=1)


def is_missing(value: Any) -> bool:
    """No figure: None, or the NaN that pandas and JSON's null become."""
    return value is None or (isinstance(value, float) and math.isnan(value))
