"""Memory-saving strategies, registered by number and name.

Importing this package imports every module in it (each registers its strategies: a new
strategy is one new file), then the user's own modules named by
``GPUTECH_BENCH_STRATEGY_MODULES`` (see ``discovery.py``). ``plan.build_plan`` composes a
cell's strategies into one training setup.
"""

from ..errors import StrategyError
from .base import MicroBatch, Placement, RunContext, Strategy
from .discovery import import_package_modules, import_user_modules
from .plan import TrainingPlan, build_plan, device_refusal, launch_refusal
from .registry import (
    BASELINE,
    Cell,
    combination_refusal,
    parse_cell,
    register,
    registered,
    unregister,
)

__all__ = [
    "BASELINE",
    "Cell",
    "MicroBatch",
    "Placement",
    "RunContext",
    "Strategy",
    "StrategyError",
    "TrainingPlan",
    "build_plan",
    "combination_refusal",
    "device_refusal",
    "launch_refusal",
    "parse_cell",
    "register",
    "registered",
    "unregister",
]

# Last, once every name above exists: a user's module imports them from this package.
import_package_modules(__name__, __path__)
import_user_modules()
