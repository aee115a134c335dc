"""The errors a user can cause, and how a failure becomes a result status."""

from __future__ import annotations

import traceback

import torch

from .cell import DeviceError
from .config import ConfigError
from .data import DataError
from .messages import first_line
from .modeling import ModelError
from .results import ResultError
from .strategies import StrategyError

#: Problems with the user's input: one line, no traceback.
USER_ERRORS = (ConfigError, DataError, DeviceError, ModelError, ResultError, StrategyError)

TRACEBACK_LINES = 15


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # Some extensions (bitsandbytes kernels, cuBLAS handles) surface OOM as a plain RuntimeError.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def classify(error: BaseException) -> tuple[str, str, list[str] | None]:
    """(status, one-line reason, last traceback lines or None for a user error)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", "interrupted (Ctrl-C or SIGTERM) before the cell finished", None
    if isinstance(error, USER_ERRORS):
        return "error", first_line(error), None
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines).rstrip().splitlines()[-TRACEBACK_LINES:]
    status = "oom" if is_out_of_memory(error) else "error"
    return status, f"{type(error).__name__}: {first_line(error)}", tail
