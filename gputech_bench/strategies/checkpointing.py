"""Strategy 1: activation (gradient) checkpointing through transformers.

The transformers API checkpoints each of a model's own layers (BertLayer, TransformerBlock,
LlamaDecoderLayer...), so it works on every architecture the project loads without knowing
their structure."""

from __future__ import annotations

from torch import nn

from ..errors import StrategyError
from .base import RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on checkpointing with the non-reentrant implementation.

    transformers 5 names the method ``activation_checkpointing_enable`` and warns on
    the 4.x name ``gradient_checkpointing_enable``; use whichever the installed
    version has. Non-reentrant checkpointing is torch's recommendation and, unlike
    the reentrant one, works when the inputs do not require grad (frozen embeddings
    under LoRA).
    """
    kwargs = {"use_reentrant": False}
    if getattr(model, "supports_gradient_checkpointing", True) is False:
        # transformers raises a ValueError mid-setup; say it in one line with the way out.
        raise StrategyError(
            f"{type(model).__name__} does not support activation checkpointing in transformers: "
            "leave strategy 1 out for this model"
        )
    # (torch types a module's attributes as Tensor | Module, so mypy sees no method in either.)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        raise StrategyError(f"{type(model).__name__} has no checkpointing method: strategy 1 needs a transformers model")


def is_checkpointing(model: nn.Module) -> bool:
    for attribute in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(model, attribute):
            return bool(getattr(model, attribute))
    return False


@register
class Checkpointing(Strategy):
    key = "1"
    name = "checkpointing"
    saves = "activations: keeps each layer's input only and recomputes the rest during backward"
    costs = "about one extra forward pass per step (~30% more compute)"
    order = 10
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(4 / 3, "reasoned: one more forward pass per step, a forward being about 1/3 of forward+backward")
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        enable_activation_checkpointing(model)
        return model

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        return {"checkpointing": "transformers activation checkpointing, use_reentrant=False"}
