"""Memory-saving strategies, registered by number and name.

Importing this package registers the seed's five and the modern ones (qlora included); ``plan.build_plan`` composes
a cell's strategies into one training setup.
"""

from ..errors import StrategyError
from . import (  # noqa: F401  (registration)
    accumulation,
    adam8bit,
    amp,
    checkpointing,
    compile,
    fsdp_offload,
    lora,
    mixed_precision,
    paged_adam8bit,
    qlora,
    sparse_head,
)
from .base import MicroBatch, Placement, RunContext, Strategy
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
