"""gputech-bench: which memory-saving strategy makes a transformer fine-tune fit, and at what cost.

The Python API does what the commands do (docs/api.md)::

    >>> from gputech_bench import run_matrix
    >>> run = run_matrix(strategies=["1"], preset="cpu", device="cpu", overrides={"train.max_steps": 4})
    >>> print(run.frame)

Importing the package stays light: every worker process imports it, so the API's names are
loaded on first use (PEP 562), not here.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: The public API; each name is documented in docs/api.md (a test checks).
__all__ = [
    "run_matrix",
    "load_run",
    "estimate",
    "fit",
    "compare",
    "strategies",
    "presets",
    "Run",
    "Estimate",
    "Fit",
    "RunComparison",
    "UserError",
]

#: Public functions that share their name with a subpackage (``gputech_bench.estimate``,
#: ``gputech_bench.strategies``). Python binds a subpackage to the package's attribute of
#: that name when it is first imported, and workers import both, so a plain function there
#: would be replaced by the subpackage. Instead the subpackage itself is made callable: the
#: one object is both the package and the public function (called, it runs the API's).
_CALLABLE_SUBPACKAGES = frozenset({"estimate", "strategies"})


def _api(name: str) -> Any:
    return getattr(import_module(f"{__name__}.api"), name)


class _CallableSubpackage(types.ModuleType):
    """A subpackage that, called, is the API function of the same name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _api(self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self) -> Any:  # what inspect.signature and IPython's ``?`` show: the function's
        import inspect

        return inspect.signature(_api(self.__name__.rpartition(".")[2]))


def _subpackage_doc(module: types.ModuleType) -> str | None:
    """The function's docstring (help() and ``?`` show it), then the subpackage's own."""
    own = module.__dict__.get("__doc__")
    try:
        function_doc = _api(module.__name__.rpartition(".")[2]).__doc__
    except Exception:  # noqa: BLE001 - a docstring must never break an import or help()
        return own
    return f"{function_doc}\n\nAlso the package {module.__name__}: {own or ''}"


# A data descriptor on the class wins over the module's own __doc__ attribute.
_CallableSubpackage.__doc__ = property(_subpackage_doc)  # type: ignore[assignment]


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE_SUBPACKAGES and type(value) is types.ModuleType and value.__name__ == f"{__name__}.{name}":
            value.__class__ = _CallableSubpackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _CALLABLE_SUBPACKAGES:
        return import_module(f"{__name__}.{name}")  # binds itself, made callable, as an attribute
    value = _api(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
