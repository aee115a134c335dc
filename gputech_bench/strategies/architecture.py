"""What strategies need to know about the architecture they act on.

Strategies act on any masked-LM or causal LM that ``modeling.load_model`` builds. Most of
them only use the transformers API; the few that reach into a model's structure (LoRA's
target modules, the base model and head that the loss and predict hooks split a model into,
fsdp-offload's repeated block) look it up here, and a refusal names the model type and the fix.

Two entry points per question: one from the config alone (``config.json``, no weights,
cheap enough to refuse a cell before any process starts) and one from the model object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

from ..errors import ModelError, StrategyError
from ..modeling import FIELDS, model_task, read_config, source_kind

if TYPE_CHECKING:
    from ..config import BenchConfig

#: LoRA targets for model types peft has no default for. peft's own table
#: (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) comes first; this only fills gaps,
#: with the same choice peft makes elsewhere: the query and value projections of attention.
LORA_TARGETS_NOT_IN_PEFT: dict[str, tuple[str, ...]] = {
    "distilbert": ("q_lin", "v_lin"),  # DistilBertSelfAttention's query and value Linear
}


# --------------------------------------------------------------------------- the model type


def pretrained_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``, however it is wrapped (peft, sparse-head, DDP)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return model


def model_type_of(model: nn.Module) -> str:
    return getattr(getattr(pretrained_model(model), "config", None), "model_type", "") or "?"


def config_model_type(config: "BenchConfig") -> str | None:
    """The model type a cell will train (``bert`` for the seed's fields), from ``config.json``
    alone; None when the config cannot be read, which loading the model will report itself."""
    try:
        if source_kind(config.model.pretrained) == FIELDS:
            return "bert"
        return read_config(config.model.pretrained).model_type
    except ModelError:
        return None


def config_task(config: "BenchConfig") -> str | None:
    """``mlm`` or ``clm`` from the config alone; None when loading will refuse the model anyway."""
    try:
        return model_task(config.model)
    except ModelError:
        return None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal-LM classes (AutoModelForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(pretrained_model(model)).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


# --------------------------------------------------------------------------- LoRA targets


def lora_targets_for(model_type: str) -> tuple[tuple[str, ...], str] | None:
    """(target module names, where they come from) for ``model_type``, or None when neither
    peft nor this project knows them."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    peft_default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if peft_default:
        return tuple(peft_default), f"peft's default for {model_type}"
    if model_type in LORA_TARGETS_NOT_IN_PEFT:
        return LORA_TARGETS_NOT_IN_PEFT[model_type], f"gputech-bench's table for {model_type} (peft has none)"
    return None


def resolve_lora_targets(configured: tuple[str, ...], model_type: str | None, strategy: str) -> tuple[tuple[str, ...], str]:
    """The modules LoRA adapts: ``strategy.lora_targets`` when set, else the model type's default."""
    if configured:
        return tuple(configured), "strategy.lora_targets"
    found = lora_targets_for(model_type or "?")
    if found is None:
        raise StrategyError(
            f"{strategy} has no default LoRA target modules for model type '{model_type}' (peft has none either): "
            "name its attention projections with --set strategy.lora_targets=NAME,NAME"
        )
    return found


# --------------------------------------------------------------------------- masked-LM heads


def _distilbert_head(mlm: nn.Module) -> Callable:
    # DistilBertForMaskedLM.forward applies these four in this order to the hidden states.
    def head(hidden):
        # (torch types a module's attributes as Tensor | Module: these four are modules.)
        return mlm.vocab_projector(mlm.vocab_layer_norm(mlm.activation(mlm.vocab_transform(hidden))))  # type: ignore[operator]

    return head


#: model type -> (the masked-LM's base-model attribute, its head as a function of the model).
#: The head maps last hidden states (positions x hidden) to vocabulary scores, exactly as the
#: model's own forward does after its base model.
MASKED_LM_HEADS: dict[str, tuple[str, Callable[[nn.Module], Callable]]] = {
    "bert": ("bert", lambda mlm: mlm.get_submodule("cls")),
    "roberta": ("roberta", lambda mlm: mlm.get_submodule("lm_head")),
    "distilbert": ("distilbert", _distilbert_head),
}


def masked_lm_head_refusal(model_type: str | None) -> str | None:
    """Why sparse-head cannot split this model type's masked-LM into base model and head, or None."""
    if model_type is None or model_type in MASKED_LM_HEADS:
        return None
    return (
        f"sparse-head knows the masked-LM heads of {', '.join(sorted(MASKED_LM_HEADS))}, not of a '{model_type}' "
        "model: leave sparse-head out for this model"
    )


def split_masked_lm(mlm: nn.Module) -> tuple[nn.Module, Callable]:
    """(base model, head) of a masked-LM of a known type."""
    model_type = model_type_of(mlm)
    refusal = masked_lm_head_refusal(model_type)
    if refusal:
        raise StrategyError(refusal)
    base, head = MASKED_LM_HEADS[model_type]
    return getattr(mlm, base), head(mlm)


def split_language_model(model: nn.Module, causal: bool) -> tuple[nn.Module, Callable]:
    """(base model, head) of the transformers model inside ``model`` (peft and the other
    wrappers inject their layers in place): the base model's ``last_hidden_state`` through the
    head gives the scores the model's own forward gives."""
    inner = pretrained_model(model)
    return split_causal_lm(inner) if causal else split_masked_lm(inner)


# --------------------------------------------------------------------------- causal-LM heads


#: Config fields with which a causal LM's forward changes the scores after its LM head
#: (Gemma 2's soft-capping, Cohere's and Granite's scaling): the head alone would not give
#: the model's scores, so no hidden-state hook may stand in for its forward.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm_head_refusal(lm: nn.Module) -> str | None:
    """Why a causal LM's scores are not its output embeddings applied to its base model's
    hidden states, or None when they are."""
    config = getattr(lm, "config", None)
    for field in LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            return (
                f"a '{model_type_of(lm)}' model changes its scores after the LM head ({field}={value}), so a "
                "strategy that computes the loss from the hidden states cannot run on it: leave it out for this model"
            )
    base = getattr(lm, "base_model", lm)
    if base is lm or lm.get_output_embeddings() is None:  # type: ignore[operator]
        return f"{type(lm).__name__} has no separate base model and LM head: leave the strategy out for this model"
    return None


def split_causal_lm(lm: nn.Module) -> tuple[nn.Module, Callable]:
    """(base model, LM head) of a causal LM: LlamaForCausalLM's ``model`` and ``lm_head``,
    GPT-2's ``transformer`` and ``lm_head``, found through transformers' own accessors."""
    refusal = causal_lm_head_refusal(lm)
    if refusal:
        raise StrategyError(refusal)
    # (torch types a module's attributes as Tensor | Module: these are a module and a method.)
    return lm.base_model, lm.get_output_embeddings()  # type: ignore[return-value,operator]


# --------------------------------------------------------------------------- repeated blocks


def repeated_blocks(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The model's own repeated block (its transformer layers), and how they were found.

    transformers lists the classes a model must never be split inside in ``_no_split_modules``
    (BertLayer, LlamaDecoderLayer...); the instances of those that sit in an ``nn.ModuleList``
    are the repeated blocks (BERT's list also names BertEmbeddings, which is not repeated).
    A model that lists none (DistilBERT) falls back to the elements of its largest ModuleList,
    by parameters: the layer stack.
    """
    inner = pretrained_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module)]
    if names:
        blocks = [block for blocks in lists for block in blocks if type(block).__name__ in names]
        if blocks:
            classes = sorted({type(block).__name__ for block in blocks})
            return blocks, f"{', '.join(classes)} (the model's _no_split_modules)"
    if not lists:
        raise StrategyError(
            f"{type(inner).__name__} has no repeated block (no _no_split_modules and no nn.ModuleList of layers): "
            "fsdp-offload has nothing to gather layer by layer; leave it out for this model"
        )

    def size(blocks: nn.ModuleList) -> int:
        return sum(p.numel() for p in blocks.parameters())

    largest = max(lists, key=size)
    classes = sorted({type(block).__name__ for block in largest})
    return list(largest), f"{', '.join(classes)} (elements of the largest nn.ModuleList; the model has no _no_split_modules)"
