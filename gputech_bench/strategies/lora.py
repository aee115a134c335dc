"""LoRA through peft: low-rank adapters on attention, the base model frozen."""

from __future__ import annotations

from torch import nn

from .base import RunContext, Strategy
from .registry import register


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@register
class Lora(Strategy):
    key = "lora"
    name = "lora"
    saves = "gradients and optimizer state of the frozen base (only the adapters train)"
    costs = "trains a different, much smaller set of parameters: accuracy can differ from full fine-tuning"
    order = 50
    gives_up = "trains only the adapters, a different set of parameters: accuracy can differ"
    requires = "peft"

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        options = ctx.config.strategy
        config = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=list(options.lora_targets),
            bias="none",
        )
        return get_peft_model(model, config)

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        trainable, total = count_parameters(model)
        return {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": round(100.0 * trainable / total, 4),
            "lora": {"r": ctx.config.strategy.lora_r, "alpha": ctx.config.strategy.lora_alpha,
                     "dropout": ctx.config.strategy.lora_dropout, "targets": list(ctx.config.strategy.lora_targets)},
        }
