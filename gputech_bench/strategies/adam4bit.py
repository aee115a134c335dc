"""adam4bit: torchao's AdamW4bit (block-wise 4-bit optimizer state).

Each Adam moment of a large tensor is kept as 4-bit codes, two to a byte, with one fp32
scale per block of 128 values: about 0.53 byte per value against AdamW's 4, an eighth of
the state. The first moment uses a signed dynamic-exponent code book, the second a linear
one without zero (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"). The
update itself runs in fp32, one compiled function per parameter.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .base import RunContext, Strategy
from .facts import StateLocation, TimeFactor, modelled_by
from .registry import register
from .torchao_optim import (
    BLOCK_SIZE,
    QUANTISED_FROM_VALUES,
    TRACKED_STEP_NOTE,
    TORCHAO_REQUIREMENT,
    MomentSplit,
    load_torchao_optim,
    low_bit_adamw,
    probe_step,
    torchao_version,
)

BITS = 4


@register
class Adam4bit(Strategy):
    key = "adam4bit"
    name = "adam4bit"
    saves = "optimizer state: two 4-bit moments instead of two fp32 (about 1 of 8 bytes per parameter)"
    costs = ("quantisation work in each step, and the first step compiles each parameter shape's update "
             "(torch.compile; seconds, kept out of the timing)")
    order = 31
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "reasoned, not measured: the compiled per-parameter update is small next to "
                                  "forward and backward, as strategy 3's")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ("torchao",)
    micro_batch_counts = ()
    # The estimate's trace cannot follow it (``untraceable``): the cell is traced with the
    # baseline's AdamW and its moments are replaced by 4-bit ones (estimator/modelled.py).
    estimate = modelled_by("low-bit-state", traced_in_its_place=None)
    untraceable = "torchao's compiled update quantises real values, which fake tensors do not have"
    #: Bits a quantised moment value takes: what the estimate's low-bit-state model counts.
    state_bits = BITS
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    gives_up = (f"quantised optimizer moments (4-bit, blocks of {BLOCK_SIZE[BITS]}): less exact updates (a "
                f"from-scratch run of the cpu preset learnt slower than AdamW); tensors under "
                f"{QUANTISED_FROM_VALUES:,} values keep full-width moments")
    requires = f"{TORCHAO_REQUIREMENT}; torch.compile: a C++ compiler on CPU, Triton on CUDA"

    def device_refusal(self, ctx: RunContext) -> None:
        load_torchao_optim("leave adam4bit out")
        if not ctx.tracing:
            probe_step(BITS, ctx.device, "leave adam4bit out")

    def build_optimizer(self, params: Iterable[torch.Tensor], ctx: RunContext) -> torch.optim.Optimizer:
        # The baseline's AdamW betas (torch's defaults), so that only the state's width differs.
        return low_bit_adamw(BITS, params, ctx, betas=(0.9, 0.999), otherwise="leave adam4bit out")

    def describe(self, model, ctx: RunContext) -> dict:
        return {
            "optimizer_backend": "torchao",
            "torchao_version": torchao_version(),
            "state_block_size": BLOCK_SIZE[BITS],
            **MomentSplit.of(model.parameters(), BITS).describe(BITS),
            "memory_tracked_step": TRACKED_STEP_NOTE,
        }
