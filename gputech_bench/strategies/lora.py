"""LoRA through peft: low-rank adapters on attention, the base model frozen.

The adapted modules are ``strategy.lora_targets`` when set; left empty, they are peft's
default for the model type (BERT and RoBERTa: query, value; Llama: q_proj, v_proj), or the
project's own where peft has none (``architecture.LORA_TARGETS_NOT_IN_PEFT``). A model type
neither knows is refused before any process starts, naming the setting to use.

A head that loading initialised afresh (a checkpoint saved without its masked-LM head) has
learnt nothing, and frozen it would stay random: LoRA trains it in full, through peft's
``modules_to_save``. It reads those modules from ``RunContext.new_head_modules``, which the
worker fills from the load report.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .architecture import config_model_type, is_causal_lm, model_type_of, resolve_lora_targets
from .base import RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; peft's count, where it applies, unpacks 4-bit weights
    (a uint8 Params4bit element holds two parameters)."""
    peft_model = next((m for m in model.modules() if hasattr(m, "get_nb_trainable_parameters")), None)
    if peft_model is not None:
        # (torch types a module's attributes as Tensor | Module: this one is a method.)
        return peft_model.get_nb_trainable_parameters()  # type: ignore[operator]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def lora_config(model: nn.Module, ctx: RunContext, strategy: str):
    """peft's LoraConfig for ``model``: targets resolved for its type, a new head in full."""
    from peft import LoraConfig, TaskType

    options = ctx.config.strategy
    targets, _ = resolve_lora_targets(options.lora_targets, model_type_of(model), strategy)
    heads = ctx.new_head_modules
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(targets),
        bias="none",
        modules_to_save=list(heads) or None,
        # peft's causal-LM wrapper for a causal LM; a masked-LM keeps the plain PeftModel
        # it always had (peft has no masked-LM task type).
        task_type=TaskType.CAUSAL_LM if is_causal_lm(model) else None,
    )


def lora_facts(model: nn.Module, ctx: RunContext, strategy: str) -> dict[str, Any]:
    """The adapters as built: rank, alpha, dropout, the modules they target and why those."""
    options = ctx.config.strategy
    targets, source = resolve_lora_targets(options.lora_targets, model_type_of(model), strategy)
    trainable, total = count_parameters(model)
    facts: dict[str, Any] = {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100.0 * trainable / total, 4),
        "lora": {"r": options.lora_r, "alpha": options.lora_alpha, "dropout": options.lora_dropout,
                 "targets": list(targets), "targets_from": source},
    }
    heads = ctx.new_head_modules
    if heads:
        facts["lora"]["trained_in_full"] = list(heads)
        facts["lora"]["trained_in_full_because"] = "loading initialised this head afresh (peft modules_to_save)"
    return facts


@register
class Lora(Strategy):
    key = "lora"
    name = "lora"
    saves = "gradients and optimizer state of the frozen base (only the adapters train)"
    costs = "trains a different, much smaller set of parameters: accuracy can differ from full fine-tuning"
    order = 50
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(0.75, "reasoned: frozen weights need no weight gradients (a backward of about one forward)")
    changes_activations_only = False
    trains_adapters = True
    state_location = StateLocation.DEVICE
    libraries = ("peft",)
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    gives_up = "trains only the adapters, a different set of parameters: accuracy can differ"
    requires = "peft; target modules for the model type (peft's default, or strategy.lora_targets)"

    def config_refusal(self, config) -> None:
        if not config.strategy.lora_targets:
            resolve_lora_targets((), config_model_type(config), self.key)

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(model, ctx, self.key))

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        return lora_facts(model, ctx, self.key)
