"""The Python API: what the commands do, callable from a notebook or a script.

``from gputech_bench import run_matrix, load_run, estimate, fit, compare, list_strategies,
list_presets`` (the package re-exports these names). The command line is a thin layer over
them: each command calls the function of the same purpose and prints what it returns.
"""

from ..errors import UserError
from ._catalog import list_presets, list_strategies
from ._compare import RunComparison, compare
from ._estimate import Estimate, estimate
from ._fit import Fit, Verification, fit
from ._output import Output
from ._run import Run, load_run, run_matrix

__all__ = [
    "Estimate",
    "Fit",
    "Output",
    "Run",
    "RunComparison",
    "UserError",
    "Verification",
    "compare",
    "estimate",
    "fit",
    "list_presets",
    "list_strategies",
    "load_run",
    "run_matrix",
]
