"""Compose a cell's strategies into one training setup.

Each exclusive hook goes to the one strategy that owns it, or to the baseline's
behaviour in ``defaults``; ``prepare_model`` hooks run in the strategies' order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import StrategyError
from .base import MicroBatch, Placement, Precision, RunContext, Strategy
from .defaults import InPlacePlacement, build_adamw, whole_batch
from .distributed import data_parallel
from .registry import Cell, combination_refusal

if TYPE_CHECKING:
    from ..config import BenchConfig


@dataclass
class TrainingPlan:
    """The objects a training loop needs, whatever strategies produced them."""

    cell: Cell
    strategies: list[Strategy]
    placement: Placement
    optimizer: torch.optim.Optimizer
    split_batch: Callable[[dict[str, torch.Tensor]], list[MicroBatch]]
    precision: Precision
    facts: dict[str, Any]
    #: Rows of one forward pass in training (a micro-batch under accumulation).
    rows_per_forward: int
    #: A batch of a new shape recompiles the model (torch.compile).
    recompiles_on_new_shapes: bool = False

    @property
    def model(self) -> nn.Module:
        return self.placement.compute_model


def launch_refusal(cell: Cell, config: "BenchConfig", cuda: bool | None = None) -> list[Strategy]:
    """Launch stage: refuse an undefined combination, a cell that needs CUDA on a run without
    it, or one the config rules out; cheap enough for the runner before any process starts.
    Returns the cell's strategies when none refuses.

    ``cuda`` says whether the run will have a CUDA device (None: not known yet, as in a trace)."""
    reason = combination_refusal(cell)
    if reason:
        raise StrategyError(f"refused combination: {reason}")
    strategies = cell.instantiate()
    for strategy in strategies:
        if strategy.needs_cuda and cuda is False:
            raise StrategyError(
                f"{strategy.key} needs a CUDA device and this run has none ({strategy.requires}): "
                "run it on a GPU machine, or leave it out"
            )
        strategy.config_refusal(config)
    return strategies


def device_refusal(cell: Cell, ctx: RunContext) -> list[Strategy]:
    """Device stage: everything ``launch_refusal`` checks, plus what this device and
    installation need (and, in a trace, whether the estimate can follow each strategy)."""
    strategies = launch_refusal(cell, ctx.config)
    for strategy in strategies:
        refusal = type(strategy).trace_refusal(ctx.device.type) if ctx.tracing else None
        if refusal:
            raise StrategyError(f"{strategy.key} cannot be traced ({refusal}): measure it with 'run'")
        strategy.device_refusal(ctx)
    return strategies


def build_plan(cell: Cell, model: nn.Module, ctx: RunContext) -> TrainingPlan:
    strategies = device_refusal(cell, ctx)
    for strategy in strategies:  # already in canonical order
        model = strategy.prepare_model(model, ctx)
    owners = {hook: strategy for strategy in strategies for hook in strategy.claims()}

    placement = owners["placement"].placement(model, ctx) if "placement" in owners else InPlacePlacement(model, ctx)
    if ctx.world_size > 1 and not placement.shards:
        placement.compute_model = data_parallel(placement.compute_model, ctx.device)
    params = placement.optimizer_parameters()
    if "build_optimizer" in owners:
        optimizer = owners["build_optimizer"].build_optimizer(params, ctx)
    else:
        optimizer = build_adamw(params, ctx)
    splitter = owners.get("split_batch")
    split = (lambda batch: splitter.split_batch(batch, ctx)) if splitter else (lambda batch: whole_batch(batch, ctx))
    rows_per_forward = splitter.rows_per_forward(ctx) if splitter else ctx.rank_batch_size
    precision = owners["precision"].precision(ctx) if "precision" in owners else Precision()

    facts: dict[str, Any] = {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "compute_dtype": str(placement.compute_dtype).removeprefix("torch."),
        "gradient_clipping": placement.clips_gradients and ctx.config.train.max_grad_norm > 0,
    }
    trainable = sum(p.numel() for p in placement.compute_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in placement.compute_model.parameters())
    facts.update(trainable_parameters=trainable, total_parameters=total)
    for strategy in strategies:
        facts.update(strategy.describe(placement.compute_model, ctx))
    recompiles = any(type(strategy).recompiles_on_new_shapes for strategy in strategies)
    return TrainingPlan(cell, strategies, placement, optimizer, split, precision, facts, rows_per_forward, recompiles)
