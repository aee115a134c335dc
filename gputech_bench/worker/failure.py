"""How a failure becomes a result status.

Import-light on purpose (no torch at import time): the worker may need it while
torch itself is still being imported when a SIGTERM arrives.
"""

from __future__ import annotations

import sys
import traceback

from ..errors import UserError, error_line, first_line

TRACEBACK_LINES = 15


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if out_of_memory is not None and isinstance(error, out_of_memory):
        return True
    # Some extensions (bitsandbytes kernels, cuBLAS handles) surface OOM as a plain RuntimeError.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def classify(error: BaseException) -> tuple[str, str, list[str] | None]:
    """(status, one-line reason, last traceback lines or None for a user error)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", "interrupted (Ctrl-C or SIGTERM) before the cell finished", None
    if isinstance(error, UserError):
        return "error", first_line(error), None
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines).rstrip().splitlines()[-TRACEBACK_LINES:]
    status = "oom" if is_out_of_memory(error) else "error"
    return status, error_line(error), tail
