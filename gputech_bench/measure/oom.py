"""What an out-of-memory error says: how much was asked for, and how much was in use.

PyTorch writes these figures into the message of ``torch.OutOfMemoryError``
("Tried to allocate 2.00 GiB ... this process has 21.50 GiB memory in use. Of the
allocated memory 20.10 GiB is allocated by PyTorch ..."). They are parsed, not
guessed: a field the message does not state stays absent.

With NVML, PyTorch lists every process on the GPU ("Process 1234 has 10.00 GiB memory
in use. ... this process has ..."). Only this process's line is its usage; the others
are kept apart, since they explain why the card ran out.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..units import GIB, KIB, MIB, TIB

# PyTorch writes sizes under 1 KiB as "bytes" ("0 bytes is allocated by PyTorch").
_UNITS = {"bytes": 1, "B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": TIB}
_AMOUNT = r"([0-9]+(?:\.[0-9]+)?) (bytes|B|KiB|MiB|GiB|TiB)"
_FIELDS = {
    "requested_mib": rf"Tried to allocate {_AMOUNT}",
    "device_total_mib": rf"total capacity of {_AMOUNT}",
    "device_free_mib": rf"of which {_AMOUNT} is free",
    "allocated_by_pytorch_mib": rf"{_AMOUNT} is allocated by PyTorch",
    "reserved_unallocated_mib": rf"{_AMOUNT} is reserved by PyTorch but unallocated",
}
_OWN = rf"this process has {_AMOUNT} memory in use"
_PROCESS = rf"Process (\d+) has {_AMOUNT} memory in use"


def _mib(number: str, unit: str) -> float:
    return round(float(number) * _UNITS[unit] / MIB, 1)


def _process_usage(message: str, pid: int) -> tuple[float | None, dict[str, float]]:
    """(this process's MiB, {another process's PID: its MiB}) from the message's process list.

    Newer PyTorch writes "this process has" for its own line, older ones "Process <pid>"."""
    own = re.search(_OWN, message)
    own_mib = _mib(*own.groups()) if own else None
    others: dict[str, float] = {}
    for match in re.finditer(_PROCESS, message):
        process, amount = match.group(1), _mib(match.group(2), match.group(3))
        if int(process) != pid:
            others[process] = amount  # keyed by string, as the result's JSON stores it
        elif own_mib is None:
            own_mib = amount
    return own_mib, others


def parse_oom_message(message: str, pid: int | None = None) -> dict[str, Any]:
    """The figures the message states; ``pid`` is this process's (os.getpid() unless a test says)."""
    details: dict[str, Any] = {}
    for name, pattern in _FIELDS.items():
        match = re.search(pattern, message)
        if match:
            details[name] = _mib(*match.groups())
    own_mib, others = _process_usage(message, os.getpid() if pid is None else pid)
    if own_mib is not None:
        details["process_in_use_mib"] = own_mib
    if others:
        details["other_processes_mib"] = others
    return details


def oom_reason(details: dict[str, Any], cap: dict[str, Any] | None) -> str | None:
    """A short table reason, e.g. 'out of memory: asked for 2,048 MiB with 21,504 MiB in use (cap 24,576 MiB)',
    naming what other processes held when the message lists them."""
    if "requested_mib" not in details:
        return None
    in_use = details.get("process_in_use_mib", details.get("allocated_by_pytorch_mib"))
    text = f"out of memory: asked for {details['requested_mib']:,.0f} MiB"
    if in_use is not None:
        text += f" with {in_use:,.0f} MiB in use"
    if cap:
        text += f" (cap {cap['limit_mib']:,.0f} MiB)"
    if details.get("other_processes_mib"):
        text += f", while other processes held {sum(details['other_processes_mib'].values()):,.0f} MiB"
    return text


def oom_details(error: BaseException) -> dict[str, Any]:
    """The message's figures, plus the allocator's own view at the moment it was caught."""
    details = parse_oom_message(str(error))
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            details["allocated_when_caught_mib"] = round(torch.cuda.memory_allocated() / MIB, 1)
            details["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
            details["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
    except Exception:
        pass  # the figures from the message are what matter; never fail while reporting a failure
    return details
