"""Compose a cell's strategies into one training setup.

Each exclusive hook goes to the one strategy that owns it, or to the baseline's
behaviour in ``defaults``; ``prepare_model`` hooks run in the strategies' order. The
loss and predict hooks compose in that order too (the earliest outermost) around the
model's own cross-entropy and argmax, inside a ``HiddenStateModel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import StrategyError
from .architecture import is_causal_lm, split_language_model
from .base import MicroBatch, Placement, Precision, Predictor, RunContext, Strategy, TokenLoss, TokenPredict
from .defaults import InPlacePlacement, argmax_tokens, build_adamw, logits_predictor, model_cross_entropy, whole_batch
from .distributed import data_parallel
from .hidden_states import HiddenStateModel, hidden_state_predictor
from .registry import Cell, combination_refusal, shared_hook

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
    #: How evaluation predicts: the model's own logits, or the predict hooks.
    predictor: Predictor
    facts: dict[str, Any]
    #: Rows of one forward pass in training (a micro-batch under accumulation).
    rows_per_forward: int
    #: A batch of a new shape recompiles the model (torch.compile).
    recompiles_on_new_shapes: bool = False
    #: Whether the loop clips gradients (train.max_grad_norm): the placement clips, and no
    #: strategy steps before every gradient exists.
    clips_gradients: bool = True

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
    owned_setting_clash(strategies, config)
    return strategies


def owned_setting_clash(strategies: list[Strategy], config: "BenchConfig") -> None:
    """Refuse two owners of one exclusive hook where a setting makes one of them its owner
    (``Strategy.hooks_owned_by_setting``); clashes without a setting are the combination stage's."""
    shared = shared_hook(strategies, lambda strategy: strategy.claims_under(config))
    if shared is not None:
        first, second, hook = shared
        setting = first.hooks_owned_by_setting.get(hook) or second.hooks_owned_by_setting[hook]
        raise StrategyError(
            f"'{first.key}' and '{second.key}' both own the {hook} hook while {setting} is on: "
            f"--set {setting}=false, or run them in separate cells"
        )


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


def compose_loss(strategies: list[Strategy], innermost: TokenLoss, ctx: RunContext) -> TokenLoss:
    """The strategies' loss hooks around ``innermost``: the earliest in order outermost."""
    loss = innermost
    for strategy in reversed(strategies):
        loss = strategy.wrap_loss(loss, ctx)
    return loss


def compose_predict(strategies: list[Strategy], ctx: RunContext) -> TokenPredict:
    """The strategies' predict hooks around the head's argmax: the earliest in order outermost."""
    predict: TokenPredict = argmax_tokens
    for strategy in reversed(strategies):
        predict = strategy.wrap_predict(predict, ctx)
    return predict


def hidden_state_model(model: nn.Module, causal: bool, strategies: list[Strategy], ctx: RunContext) -> HiddenStateModel:
    """``model`` run to its final hidden states, with the strategies' hooks composed on them.
    Training's innermost loss is the model's own cross-entropy; evaluation's is in fp32."""
    split_language_model(model, causal)  # refuses here, before training, a model it cannot split
    return HiddenStateModel(
        model,
        causal,
        train_loss=compose_loss(strategies, model_cross_entropy(upcast=causal), ctx),
        eval_loss=compose_loss(strategies, model_cross_entropy(upcast=True), ctx),
        predict=compose_predict(strategies, ctx),
    )


def build_plan(cell: Cell, model: nn.Module, ctx: RunContext) -> TrainingPlan:
    strategies = device_refusal(cell, ctx)
    causal = is_causal_lm(model)
    # The loss and predict hooks wrap the model where their first user stands in the order:
    # the strategies before it (checkpointing, LoRA) change the model inside the wrapper,
    # those after it (compile) act on the wrapper.
    first_user = next((strategy for strategy in strategies if strategy.uses_hidden_states()), None)
    for strategy in strategies:  # already in canonical order
        if strategy is first_user:
            model = hidden_state_model(model, causal, strategies, ctx)
        model = strategy.prepare_model(model, ctx)
    owners = {hook: strategy for strategy in strategies for hook in strategy.claims_under(ctx.config)}

    placement = owners["placement"].placement(model, ctx) if "placement" in owners else InPlacePlacement(model, ctx)
    if ctx.world_size > 1 and not placement.shards and not ctx.tracing:
        # A trace cannot run DDP's C++ reducer on fake tensors: the estimate adds its
        # gradient buckets itself (``estimator.trace``).
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
    compute_model = placement.compute_model
    predictor = hidden_state_predictor(compute_model) if first_user else logits_predictor(compute_model, causal)

    clips_gradients = placement.clips_gradients and all(type(s).allows_gradient_clipping for s in strategies)
    facts: dict[str, Any] = {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "compute_dtype": str(placement.compute_dtype).removeprefix("torch."),
        "gradient_clipping": clips_gradients and ctx.config.train.max_grad_norm > 0,
    }
    trainable = sum(p.numel() for p in placement.compute_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in placement.compute_model.parameters())
    facts.update(trainable_parameters=trainable, total_parameters=total)
    for strategy in strategies:
        facts.update(strategy.describe(placement.compute_model, ctx))
    for strategy in strategies:  # after the facts, which name the optimizer that was built
        optimizer = strategy.wrap_optimizer(optimizer, ctx)
    recompiles = any(type(strategy).recompiles_on_new_shapes for strategy in strategies)
    return TrainingPlan(cell, strategies, placement, optimizer, split, precision, predictor, facts, rows_per_forward,
                        recompiles, clips_gradients)
