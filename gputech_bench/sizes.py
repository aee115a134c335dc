"""Memory sizes as people write them: '24GiB', '24 GB', '24G', '512MiB'."""

from __future__ import annotations

import re

from .messages import UserError

# Binary units for the forms GPU tools print (GiB, MiB, and the bare G/M shorthand);
# decimal units only where the SI prefix says so (GB, MB), as disk vendors use them.
UNITS = {
    "b": 1,
    "kib": 2**10, "k": 2**10, "kb": 10**3,
    "mib": 2**20, "m": 2**20, "mb": 10**6,
    "gib": 2**30, "g": 2**30, "gb": 10**9,
    "tib": 2**40, "t": 2**40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


class SizeError(UserError):
    """A memory size that cannot be read."""


def parse_size(text: str) -> int:
    """Bytes in ``text``; a bare number is GiB, the unit people size GPUs in."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in UNITS):
        raise SizeError(f"cannot read memory size '{text}': write it like 24GiB, 24GB, 24G or 512MiB")
    value = float(match.group(1)) * (UNITS[unit] if unit else 2**30)
    if value <= 0:
        raise SizeError(f"memory size '{text}' must be more than zero")
    return int(value)


def format_gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"
