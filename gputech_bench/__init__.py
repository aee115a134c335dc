"""gputech-bench: which memory-saving strategy makes a transformer fine-tune fit, and at what cost.

The Python API does what the commands do (docs/api.md)::

    >>> from gputech_bench import run_matrix
    >>> run = run_matrix(strategies=["1"], preset="cpu", device="cpu", overrides={"train.max_steps": 4})
    >>> print(run.frame)

Importing the package stays light: every worker process imports it, so the API's names are
loaded on first use (PEP 562), not here.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# transformers imports torchao (installed for adam4bit) whenever it loads a model class, in
# every process: the command's own included. torchao then logs a warning for each compiled
# extension this machine cannot load (mxfp8, CUTLASS kernels for one CUDA architecture), and
# torch logs one for each enum torchao registers with a deprecated call. None of it is about
# the run, and none of it is anything the user can act on; errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

#: The public API; each name is documented in docs/api.md (a test checks).
__all__ = [
    "run_matrix",
    "load_run",
    "estimate",
    "fit",
    "compare",
    "list_strategies",
    "list_presets",
    "Run",
    "Estimate",
    "Fit",
    "RunComparison",
    "UserError",
]


def _api(name: str) -> Any:
    return getattr(import_module(f"{__name__}.api"), name)


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _api(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
