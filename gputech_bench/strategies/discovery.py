"""Which modules hold strategies: every module of this package, and the user's own files.

A strategy is one file: a module in this package registers its classes when imported, so
adding the file is the only step. A user's strategy modules outside the tree are named by
``GPUTECH_BENCH_STRATEGY_MODULES`` (``.py`` paths separated by ``os.pathsep``); they are read
from the environment when the package registers, so the worker processes and the fork
server, which inherit it, see the same strategies as the command that started them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

from ..errors import StrategyModuleError, UserError, error_line

#: The environment variable naming the user's own strategy modules.
STRATEGY_MODULES_VARIABLE = "GPUTECH_BENCH_STRATEGY_MODULES"
#: The package name a user's strategy module is imported under (its file's stem after the dot).
USER_PACKAGE = "gputech_bench_user_strategies"


def import_package_modules(package: str, path: list[str]) -> None:
    """Import every module of the strategies package, in name order: each registers its strategies."""
    for module in sorted(info.name for info in pkgutil.iter_modules(path)):
        importlib.import_module(f"{package}.{module}")


def user_module_paths() -> list[Path]:
    """The paths ``GPUTECH_BENCH_STRATEGY_MODULES`` names, in its order (empty entries skipped)."""
    text = os.environ.get(STRATEGY_MODULES_VARIABLE, "")
    return [Path(entry).expanduser() for entry in text.split(os.pathsep) if entry.strip()]


def import_user_module(path: Path) -> ModuleType:
    """Import one user strategy module by its path; any failure is one line naming the file."""
    where = f"{STRATEGY_MODULES_VARIABLE} names {path}"
    if path.suffix != ".py" or not path.is_file():
        raise StrategyModuleError(f"{where}, which is not a .py file: give the paths of strategy modules, "
                                  f"separated by '{os.pathsep}'")
    name = f"{USER_PACKAGE}.{path.stem.replace('-', '_')}"
    if name in sys.modules:  # imported once per process, as an in-tree module is
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise StrategyModuleError(f"{where}, which Python cannot load as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except UserError as error:  # a refused declaration already names its fact
        del sys.modules[name]
        raise StrategyModuleError(f"{where}: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever the user's module raises, in one line
        del sys.modules[name]
        raise StrategyModuleError(f"{where}, which failed to import: {error_line(error)}") from None
    return module


def import_user_modules() -> None:
    """Import the user's strategy modules; the first that fails raises StrategyModuleError."""
    for path in user_module_paths():
        import_user_module(path)
