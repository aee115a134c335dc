"""The result file of one cell: schema, status and atomic writing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ResultError
from .files import atomic_write_bytes

SCHEMA = "gputech-bench/cell-result/1"
STATUSES = ("ok", "eval-oom", "oom", "error", "timeout", "crashed", "interrupted")
#: Statuses whose training figures (memory, time, loss) stand: eval-oom trained to the
#: end and only its evaluation ran out of memory.
TRAINED_STATUSES = ("ok", "eval-oom")


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON; store them as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


#: What a result written before ``data.objective`` existed was trained on.
OBJECTIVE_BEFORE_THE_SETTING = "mlm"


def objective_of(result: dict[str, Any]) -> str | None:
    """The training objective a result was measured under; None for a result that never
    got as far as a config (a cell that crashed before starting)."""
    config = result.get("config")
    if not isinstance(config, dict):
        return None
    return config.get("data", {}).get("objective", OBJECTIVE_BEFORE_THE_SETTING)


def recorded_snapshot(result: dict[str, Any]) -> bool:
    """Whether the cell recorded a CUDA memory snapshot, which slows its steps."""
    return bool(result.get("memory_snapshot") or (result.get("config") or {}).get("memory_snapshot"))


def attention_of(result: dict[str, Any]) -> str | None:
    """The attention implementation the cell's model ran (eager, sdpa), as transformers named it."""
    model = result.get("model") or {}
    if model.get("attention"):
        return model["attention"]
    config = result.get("config")
    return config.get("model", {}).get("attention") if isinstance(config, dict) else None


def bare_result(cell: str, status: str, reason: str | None) -> dict[str, Any]:
    """The smallest valid result: what is known when a cell failed before measuring anything."""
    return {"schema": SCHEMA, "cell": cell, "status": status, "reason": reason, "metrics": {}, "memory_breakdown": {}, "notes": []}


def write_atomic(path: Path, result: dict[str, Any]) -> Path:
    """Write a result as JSON through a temporary file and a rename."""
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(path), text.encode("utf-8"))
    return Path(path)


def read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultError(f"{path}: not a readable JSON result ({type(error).__name__}); delete it or re-run its cell") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("status") not in STATUSES:
        raise ResultError(f"{path}: not a gputech-bench cell result; move it out of the results folder")
    return data
