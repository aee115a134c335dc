"""What a cell does on a hook that none of its strategies owns: the seed's baseline."""

from __future__ import annotations

import torch
from torch import nn

from .base import MicroBatch, Placement, RunContext


class InPlacePlacement(Placement):
    """Weights, gradients and optimizer state all live in the model on the compute device."""

    clips_gradients = True

    def __init__(self, model: nn.Module, ctx: RunContext) -> None:
        self.compute_model = model.to(ctx.device)
        self.compute_dtype = next(model.parameters()).dtype

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.compute_model.parameters() if p.requires_grad]


def build_adamw(params: list[torch.Tensor], ctx: RunContext) -> torch.optim.Optimizer:
    train = ctx.config.train
    # foreach=False: torch 2's default multi-tensor path allocates temporaries for
    # all parameters at once; the seed's 2022 torch updated tensor by tensor, and so
    # does this, to keep the baseline's optimizer-step peak comparable.
    return torch.optim.AdamW(params, lr=train.lr, eps=train.adam_eps, weight_decay=train.weight_decay, foreach=False)


def whole_batch(batch: dict[str, torch.Tensor], ctx: RunContext) -> list[MicroBatch]:
    return [MicroBatch(batch, 1.0)]
