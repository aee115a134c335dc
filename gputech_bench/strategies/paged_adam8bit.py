"""paged-adam8bit: bitsandbytes' paged 8-bit AdamW.

The 8-bit state of strategy 3, allocated in CUDA unified memory: when the GPU runs
short, the driver pages optimizer state out to host memory instead of failing, and
back in when the step needs it. Only a CUDA device has unified memory to page.
"""

from __future__ import annotations

import torch

from .adam8bit import load_bitsandbytes, probe_kernels
from .base import RunContext, Strategy, StrategyError
from .registry import register


@register
class PagedAdam8bit(Strategy):
    key = "paged-adam8bit"
    name = "paged-adam8bit"
    saves = "optimizer state: 8-bit moments (as 3), paged to host memory by the driver when the GPU runs short"
    costs = "as 3, plus page transfers over PCIe whenever memory is tight"
    order = 46
    needs_cuda = True
    requires = "CUDA (unified memory) and bitsandbytes >= 0.45 with kernels for this GPU"
    gives_up = "quantised optimizer moments (8-bit block-wise), decoupled weight decay (AdamW)"

    untraceable = "its state lives in unified memory, outside the allocator the estimate models"

    def check(self, ctx: RunContext) -> None:
        if ctx.device.type != "cuda":
            raise StrategyError(
                "paged-adam8bit needs CUDA: bitsandbytes pages optimizer state through CUDA unified memory; "
                "run it on a GPU, or use 3 (adam8bit) on this machine"
            )
        probe_kernels(load_bitsandbytes(), ctx.device)

    def build_optimizer(self, params: list[torch.Tensor], ctx: RunContext) -> torch.optim.Optimizer:
        bnb = load_bitsandbytes()
        train = ctx.config.train
        return bnb.optim.PagedAdamW8bit(
            params, lr=train.lr, betas=ctx.config.strategy.adam8bit_betas, eps=train.adam_eps,
            weight_decay=train.weight_decay,
        )

    def describe(self, model, ctx: RunContext) -> dict:
        bnb = load_bitsandbytes()
        return {
            "optimizer": "bitsandbytes.optim.PagedAdamW8bit",
            "betas": list(ctx.config.strategy.adam8bit_betas),
            "bitsandbytes_version": getattr(bnb, "__version__", "unknown"),
        }
