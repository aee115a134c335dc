"""The seed's learning-rate schedule: linear warm-up, then linear decay to zero.

The same arithmetic as ``transformers.get_linear_schedule_with_warmup`` (a test holds
the two equal step by step), written here because importing it from transformers runs
``transformers.optimization``, whose trainer utilities import peft and bitsandbytes
(and through bitsandbytes torch's inductor): about a second at every cell's start for
two libraries most cells never use.
"""

from __future__ import annotations

from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _linear_with_warmup(step: int, *, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def linear_schedule_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A learning rate rising from 0 over ``warmup_steps``, then falling to 0 at ``total_steps``."""
    return LambdaLR(optimizer, partial(_linear_with_warmup, warmup_steps=warmup_steps, total_steps=total_steps))
