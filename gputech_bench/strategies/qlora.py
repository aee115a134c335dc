"""qlora: the frozen base in 4-bit NF4 (bitsandbytes), LoRA adapters on top (peft).

QLoRA (Dettmers et al., 2023) as transformers and peft run it: every ``nn.Linear`` of the
base becomes a bitsandbytes ``Linear4bit`` whose weight is a ``Params4bit`` (two 4-bit
NormalFloat codes per uint8, plus an absmax per 64-weight block, itself quantised to 8 bits:
"double quantisation"); ``prepare_model_for_kbit_training`` freezes the base and LoRA
adapters train on top. Each forward dequantises a weight to the compute dtype just before its
matmul.

Cells build their model in the process, and it may be a random init, so there is no
checkpoint to load "in 4-bit". The model is quantised in place the way transformers' own
loader does it: ``replace_with_bnb_linear`` swaps the Linear modules for Linear4bit, and each
fp32 weight becomes a ``Params4bit`` that quantises when moved to the compute device (what
``Bnb4bitQuantize`` does with a checkpoint tensor). Only one layer's fp32 weight is ever on
the device. What transformers keeps unquantised stays so: the embeddings (not Linear), the
LM head and anything tied to the input embeddings (``get_keys_to_not_convert``), plus a head
that loading initialised afresh, which LoRA trains in full (``modules_to_save``).

The compute dtype is the model's (fp32), as in every other cell: ``amp`` on top gives the
bf16 (or fp16) compute of the QLoRA recipe, and the difference stays visible in the table.

The memory tracker reports the 4-bit weights and their quantisation constants as their own
category, ``quantized_weights`` (see ``measure/tracker.py``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..errors import StrategyError, first_line
from .adam8bit import load_bitsandbytes
from .architecture import config_model_type, pretrained_model, resolve_lora_targets
from .base import RunContext, Strategy
from .facts import StateLocation, TimeFactor, modelled_by
from .lora import lora_config, lora_facts
from .registry import register

#: NormalFloat4, the data type QLoRA introduced for normally distributed weights.
QUANT_TYPE = "nf4"
#: The absmax of each 64-weight block quantised again to 8 bits (QLoRA's double quantisation):
#: about 0.127 instead of 0.5 bits per weight of constants.
DOUBLE_QUANT = True

#: Why an 8-bit optimizer is refused beside qlora. It would run; it would show no saving: with
#: r=8 on q and v, an 8B Llama's adapters hold ~3.4M parameters, 27 MB of fp32 Adam state.
_TINY_STATE = (
    "only the LoRA adapters train, so the optimizer state is a fraction of a percent of the model and an "
    "8-bit optimizer would save almost nothing; qlora's own optimizer is AdamW on the adapters"
)


def bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=DOUBLE_QUANT,
    )


def probe_4bit(bnb, device: torch.device) -> None:
    """Quantise and dequantise a throw-away tensor: a bitsandbytes build without 4-bit kernels
    for this device fails here, in one line, instead of mid-setup."""
    try:
        packed, state = bnb.functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type=QUANT_TYPE)
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as error:
        raise StrategyError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantise to 4-bit NF4 on {device} "
            f"({first_line(error)}): install a bitsandbytes build for this device, or leave qlora out"
        ) from None


def modules_kept_unquantized(model: nn.Module, keep: list[str]) -> list[str]:
    """The module names transformers' bitsandbytes loader leaves unquantised (the LM head and
    what is tied to the input embeddings), plus ``keep``. The memory estimate reads it too."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import HfQuantizer

    pretrained = cast(PreTrainedModel, model)  # a transformers model, passed around as the nn.Module it also is
    skip = HfQuantizer.get_modules_to_not_convert(pretrained, None, getattr(model, "_keep_in_fp32_modules", None))
    return sorted(set(skip) | set(keep))


def quantize_base(model: nn.Module, config, device: torch.device, keep: list[str]) -> list[str]:
    """Replace the Linear layers of ``model`` by Linear4bit holding their weights in 4 bits on
    ``device``, in place, as transformers' bitsandbytes loader does. Returns the modules left
    unquantised. ``keep`` adds module names to transformers' own list."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    bnb = load_bitsandbytes("qlora")
    skip = modules_kept_unquantized(model, keep)
    # The fp32 Linear modules, by name, before replace_with_bnb_linear puts empty (meta) 4-bit
    # ones in their place; each is dropped as soon as its weight is quantised.
    originals = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        original = originals.pop(name)
        # The meta weight carries the quantisation settings (block size, NF4, storage type).
        settings = {key: value for key, value in vars(module.weight).items() if key != "module"}
        # Moving a Params4bit that is not yet quantised to a device quantises it there.
        module.weight = bnb.nn.Params4bit(
            original.weight.detach(), requires_grad=False, module=module, **settings
        ).to(device)
        if original.bias is not None:
            module.bias = nn.Parameter(original.bias.detach(), requires_grad=False)
    # As transformers marks a model it loaded in 4-bit; peft reads it. (torch types a module's
    # attributes as Tensor | Module, but any value can be set.)
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    return skip


def quantized_weights(model: nn.Module) -> list[Any]:
    """The 4-bit packed weights (bitsandbytes Params4bit) of ``model``."""
    return [p for p in model.parameters() if type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None]


@register
class Qlora(Strategy):
    key = "qlora"
    name = "qlora"
    saves = ("weights: the frozen base in 4-bit NF4 (about 0.52 byte per weight with its constants); gradients "
             "and optimizer state for the LoRA adapters only")
    costs = "each matmul dequantises its weight first (slower steps); the frozen base carries 4-bit rounding error"
    # Beside LoRA (the two are never combined): after 1, whose checkpointing wraps the layers
    # qlora then quantises inside; before sparse-head and compile, which act on the result.
    order = 51
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "assumed, not measured: LoRA's 0.75 times about 4/3 for dequantising every weight "
                             "before each matmul (QLoRA's commonly reported slow-down against LoRA)")
    changes_activations_only = False
    trains_adapters = True
    state_location = StateLocation.DEVICE
    libraries = ("bitsandbytes", "peft")
    micro_batch_counts = ()
    estimate = modelled_by("nf4-weights", traced_in_its_place="lora")
    in_causal_lm_matrix = True
    moves_activations_to_host = False
    gives_up = "the frozen base is rounded to 4-bit NF4 and only the adapters train: accuracy can differ"
    requires = "bitsandbytes >= 0.45 (4-bit kernels, CPU included) and peft; LoRA targets for the model type"
    incompatible = {
        "lora": "qlora already puts LoRA adapters on the base: the same adapters twice",
        "3": _TINY_STATE,
        "paged-adam8bit": _TINY_STATE,
        # Both run on CPU; what they would measure is not a recipe anyone trains with.
        "4": "strategy 4 casts every unquantised weight (embeddings, norms, LM head, adapters) to half, undoing "
             "prepare_model_for_kbit_training's fp32, while the 4-bit layers compute in fp32: neither the seed's "
             "recipe nor QLoRA's (amp+qlora is QLoRA's half compute)",
        "fsdp-offload": "FSDP2 shards and offloads parameters only: the 4-bit weights become plain uint8 DTensors "
                        "that bitsandbytes rebuilds at every forward, and their quantisation constants stay on the "
                        "device, unsharded",
    }
    untraceable = "bitsandbytes' 4-bit weight (Params4bit, a Tensor subclass) cannot be made from a fake tensor"

    def config_refusal(self, config) -> None:
        if not config.strategy.lora_targets:
            resolve_lora_targets((), config_model_type(config), self.key)

    def device_refusal(self, ctx: RunContext) -> None:
        bnb = load_bitsandbytes("qlora")
        if not ctx.tracing:
            probe_4bit(bnb, ctx.device)

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from peft import get_peft_model, prepare_model_for_kbit_training

        inner = pretrained_model(model)
        self.compute_dtype = next(inner.parameters()).dtype
        self.kept = quantize_base(inner, bnb_config(self.compute_dtype), ctx.device, list(ctx.new_head_modules))
        # Freezes the base. Its gradient checkpointing is strategy 1's to turn on, so that
        # "qlora" and "1+qlora" stay two different cells.
        inner = prepare_model_for_kbit_training(inner, use_gradient_checkpointing=False)
        return get_peft_model(inner, lora_config(inner, ctx, self.key))

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        weights = quantized_weights(model)
        states = [w.quant_state for w in weights]
        facts: dict[str, Any] = lora_facts(model, ctx, self.key)
        facts["qlora"] = {
            "quant_type": QUANT_TYPE,
            "double_quant": DOUBLE_QUANT,
            "block_size": states[0].blocksize if states else None,
            "compute_dtype": str(getattr(self, "compute_dtype", torch.float32)).removeprefix("torch."),
            "quantized_modules": len(weights),
            "quantized_parameters": sum(state.shape.numel() for state in states),
            "kept_unquantized": list(getattr(self, "kept", [])),
            "bitsandbytes_version": getattr(load_bitsandbytes("qlora"), "__version__", "unknown"),
        }
        return facts
