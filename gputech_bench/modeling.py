"""The model every cell starts from, loaded as itself.

``model.pretrained`` names one of three things, and each becomes the model it describes:

* empty: the seed's BERT, built from the ``model.*`` fields (random init);
* a folder with ``config.json`` only (or a hub id whose weights are not wanted): a random
  init of that architecture, no weights read, so a model's shape can be benchmarked or
  estimated without its weights;
* a folder with weights, or a hub id: ``AutoModelFor{MaskedLM,CausalLM}.from_pretrained``.

The task (masked-LM or causal LM) follows from the checkpoint (``model.task = auto``) or
is set. What loading left newly initialised, or ignored, is recorded in a
:class:`LoadReport`, so the result and the table can say so: a benchmark that trains a
fresh head and calls it the checkpoint's would be a silent wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig
from .errors import ModelError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MLM = "mlm"
CLM = "clm"
#: The tasks ``model.task`` names, and what each trains.
TASKS = {MLM: "masked-LM", CLM: "causal LM (next-token prediction)"}

#: File names that hold a checkpoint's weights (safetensors or pickled, whole or sharded).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")

#: Where ``model.pretrained`` points: the fields, a config-only folder, a folder with weights, a hub id.
FIELDS, CONFIG_ONLY, WEIGHTS, HUB = "fields", "config-only", "weights", "hub"


def vocab_rows_for(model_config: ModelConfig, tokenizer_size: int) -> int:
    """Embedding rows: the configured count, never fewer than the tokenizer needs."""
    if model_config.vocab_rows == 0:
        return tokenizer_size
    if model_config.vocab_rows < tokenizer_size:
        raise ModelError(
            f"model.vocab_rows ({model_config.vocab_rows}) is smaller than the tokenizer ({tokenizer_size} tokens): "
            "raise it, or set it to 0 to use the tokenizer's size"
        )
    return model_config.vocab_rows


def source_kind(pretrained: str) -> str:
    """Which of the three kinds of ``--model`` this is (see the module's docstring)."""
    if not pretrained:
        return FIELDS
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            return WEIGHTS
        if (folder / "config.json").is_file():
            return CONFIG_ONLY
        raise ModelError(
            f"'{pretrained}' holds neither config.json nor weights: pass a folder saved with save_pretrained(), "
            "a folder with a config.json (random init of that architecture), or a hub id"
        )
    if folder.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ModelError(f"model folder '{pretrained}' not found: pass an existing folder or a hub id such as 'bert-base-uncased'")
    return HUB


def _target(pretrained: str) -> str:
    """A local folder as an absolute path (``~`` expanded), a hub id as given."""
    return str(Path(pretrained).expanduser()) if Path(pretrained).expanduser().exists() else pretrained


def read_config(pretrained: str):
    """The checkpoint's ``config.json`` as transformers reads it; no weights are touched."""
    from transformers.models.auto.configuration_auto import AutoConfig

    try:
        return AutoConfig.from_pretrained(_target(pretrained))
    except Exception as error:  # hub, file-system and format errors all end here
        raise ModelError(
            f"could not read the config of '{pretrained}' ({first_line(error)}): "
            "pass a local folder holding config.json, or a reachable hub id"
        ) from None


def model_depth(model_config: ModelConfig) -> int:
    """How many blocks (layers) the model has: ``model.num_layers`` for the seed's BERT or where
    it is set for a --model, else the checkpoint config's (0 when the config names none)."""
    if not model_config.pretrained or "num_layers" in model_config.overrides:
        return model_config.num_layers
    hf_config = read_config(model_config.pretrained)
    attribute = type(hf_config).attribute_map.get("num_hidden_layers", "num_hidden_layers")
    return int(getattr(hf_config, attribute, 0) or 0)


#: Each ``model.*`` shape field and the config attributes it sets, by transformers' standard
#: names: a config's ``attribute_map`` turns them into the architecture's own (DistilBERT's
#: ``n_layers``, GPT-2's ``n_embd``). A field sets every one of its attributes that the
#: architecture has (dropout: BERT's two, GPT-2's three, Llama's attention dropout), and is
#: refused where the architecture has none.
SHAPE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "vocab_rows": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "num_layers": ("num_hidden_layers",),
    "num_heads": ("num_attention_heads",),
    "intermediate_size": ("intermediate_size", "hidden_dim", "n_inner"),
    "max_position_embeddings": ("max_position_embeddings",),
    "dropout": ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop"),
}


@dataclass(frozen=True)
class ShapeOverride:
    """One ``model.*`` field set for a ``--model``, and the checkpoint's values it replaces."""

    name: str  # e.g. num_layers
    value: Any
    replaced: tuple[tuple[str, Any], ...]  # (the architecture's attribute, the checkpoint's value)

    def __str__(self) -> str:
        was = ", ".join(f"{attribute} {_number(old)}" for attribute, old in self.replaced)
        return f"model.{self.name}={_number(self.value)} (config.json: {was})"


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def shape_overrides(model_config: ModelConfig, hf_config: Any) -> tuple[ShapeOverride, ...]:
    """The shape fields set for this ``--model`` (``model.overrides``), each mapped onto the
    checkpoint's config; a field the architecture has no attribute for is refused."""
    found = []
    for name in model_config.overrides:
        replaced: dict[str, Any] = {}
        for standard in SHAPE_ATTRIBUTES[name]:
            attribute = type(hf_config).attribute_map.get(standard, standard)
            if hasattr(hf_config, attribute):
                replaced.setdefault(attribute, getattr(hf_config, attribute))
        if not replaced:
            raise ModelError(
                f"model.{name} has no meaning for a '{hf_config.model_type}' model (its config has none of "
                f"{', '.join(SHAPE_ATTRIBUTES[name])}): drop --set model.{name}"
            )
        found.append(ShapeOverride(name, getattr(model_config, name), tuple(replaced.items())))
    return tuple(found)


def _overridden_config(model_config: ModelConfig, hf_config: Any, overrides: tuple[ShapeOverride, ...],
                       tokenizer_size: int):
    """The checkpoint's config with the overrides applied as if config.json had said them, the
    way ``AutoConfig.from_pretrained(..., **overrides)`` means it: from the file's own values, so
    that what a config derives in ``__post_init__`` (Llama's ``head_dim``) follows the new shape."""
    if not overrides:
        return hf_config
    raw, _ = type(hf_config).get_config_dict(_target(model_config.pretrained))
    for override in overrides:
        value = vocab_rows_for(model_config, tokenizer_size) if override.name == "vocab_rows" else override.value
        raw.update({attribute: value for attribute, _ in override.replaced})
    try:
        return type(hf_config).from_dict(raw)
    except Exception as error:  # transformers' own checks of a config (heads that do not divide, ...)
        raise ModelError(
            f"{', '.join(str(o) for o in overrides)} do not make a valid '{hf_config.model_type}' config "
            f"({first_line(error)}): change the overrides"
        ) from None


def _weight_shapes(task: str, hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape for this config, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = model_class(task).from_config(hf_config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_model_overrides(model_config: ModelConfig) -> tuple[ShapeOverride, ...]:
    """The overrides a cell will apply, refused here (before any process starts) when the
    architecture has no such field or when they would change the shape of a checkpoint's
    weights: those weights could not load, and a half-loaded model must never train silently.
    ``vocab_rows`` is the exception: with weights it resizes the embeddings, as the seed did."""
    if source_kind(model_config.pretrained) == FIELDS or not model_config.overrides:
        return ()
    hf_config = read_config(model_config.pretrained)
    overrides = shape_overrides(model_config, hf_config)
    if source_kind(model_config.pretrained) in (WEIGHTS, HUB):
        task = task_of(hf_config, model_config.task, f"'{model_config.pretrained}'")
        shapes = _weight_shapes(task, hf_config)
        for override in overrides:
            if override.name == "vocab_rows":
                continue
            changed = _overridden_config(model_config, hf_config, (override,), tokenizer_size=0)
            if _weight_shapes(task, changed) != shapes:
                raise ModelError(
                    f"{override} changes the shape of the weights in '{model_config.pretrained}', so they could not "
                    "load: drop the override, or point --model at a folder with only config.json to benchmark that "
                    "shape at random init"
                )
    return overrides


def _task_mappings() -> tuple[dict[str, str], dict[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def task_of(hf_config: Any, requested: str = "auto", source: str = "the model") -> str:
    """``mlm`` or ``clm``: as requested, or what the checkpoint's ``architectures`` say, or
    the one task its model type supports."""
    masked, causal = _task_mappings()
    model_type = getattr(hf_config, "model_type", "?")
    supports = {MLM: model_type in masked, CLM: model_type in causal}
    if requested != "auto":
        if not supports[requested]:
            raise ModelError(
                f"{source} is a '{model_type}' model, which transformers has no {TASKS[requested]} class for: "
                f"set model.task to {' or '.join(t for t, ok in supports.items() if ok) or 'a supported task'}"
            )
        return requested
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in architectures:
        if name.endswith("ForMaskedLM"):
            return MLM
        if name.endswith(("ForCausalLM", "LMHeadModel")) and supports[CLM]:
            return CLM
    if supports[MLM] and (not supports[CLM] or not getattr(hf_config, "is_decoder", False)):
        return MLM  # an encoder checkpoint without a head (e.g. BertModel): a masked-LM head is added
    if supports[CLM]:
        return CLM
    raise ModelError(
        f"{source} is a '{model_type}' model ({', '.join(architectures) or 'no architectures listed'}), which is neither "
        "a masked-LM nor a causal LM: gputech-bench fine-tunes AutoModelForMaskedLM and AutoModelForCausalLM "
        "architectures (BERT, RoBERTa, DistilBERT, Llama, Mistral, GPT-2...)"
    )


def model_task(model_config: ModelConfig) -> str:
    """The task a cell will train, from the config alone (reads ``config.json``, never weights);
    cheap enough to decide refusals before any process starts."""
    if source_kind(model_config.pretrained) == FIELDS:
        if model_config.task == CLM:
            raise ModelError("the model built from the model.* fields is a BERT masked-LM: set model.task=auto or mlm, "
                             "or pass a causal LM with --model")
        return MLM
    return task_of(read_config(model_config.pretrained), model_config.task, f"'{model_config.pretrained}'")


def bert_config(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int):
    """The seed's BERT, from the ``model.*`` fields."""
    from transformers.models.bert.configuration_bert import BertConfig

    config = BertConfig(
        vocab_size=vocab_rows_for(model_config, tokenizer_size),
        hidden_size=model_config.hidden_size,
        num_hidden_layers=model_config.num_layers,
        num_attention_heads=model_config.num_heads,
        intermediate_size=model_config.intermediate_size,
        max_position_embeddings=model_config.max_position_embeddings,
        hidden_dropout_prob=model_config.dropout,
        attention_probs_dropout_prob=model_config.dropout,
        pad_token_id=pad_token_id,
        use_cache=False,  # an encoder has no cache; avoids a warning under checkpointing
    )
    config._attn_implementation = model_config.attention
    return config


def architecture_config(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int):
    """The architecture a cell trains: from ``config.json`` with the shape overrides set for it,
    or the seed's BERT from the fields."""
    if source_kind(model_config.pretrained) == FIELDS:
        return bert_config(model_config, tokenizer_size, pad_token_id)
    config = read_config(model_config.pretrained)
    config = _overridden_config(model_config, config, shape_overrides(model_config, config), tokenizer_size)
    if getattr(config, "vocab_size", tokenizer_size) < tokenizer_size:
        raise ModelError(
            f"model '{model_config.pretrained}' has {config.vocab_size:,} embedding rows but the tokenizer has "
            f"{tokenizer_size:,} tokens: lower data.tokenizer_vocab_size, or give the folder its own tokenizer"
        )
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id
    config.use_cache = False  # no generation here; a cache only warns under checkpointing
    config._attn_implementation = model_config.attention
    return config


def model_class(task: str):
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if task == MLM else AutoModelForCausalLM


@dataclass(frozen=True)
class KeyGroup:
    """Checkpoint keys that share a module prefix, e.g. ``cls.predictions.*`` (5 tensors)."""

    prefix: str
    keys: int

    def __str__(self) -> str:
        return f"{self.prefix} ({self.keys} tensor{'s' if self.keys != 1 else ''})"


def group_keys(keys: list[str], depth: int = 2) -> list[KeyGroup]:
    """State-dict keys grouped by their first ``depth`` module names, in first-seen order."""
    counts: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split(".")
        prefix = ".".join(parts[: min(depth, len(parts) - 1)]) + ".*" if len(parts) > 1 else key
        counts[prefix] = counts.get(prefix, 0) + 1
    return [KeyGroup(prefix, count) for prefix, count in counts.items()]


@dataclass(frozen=True)
class LoadReport:
    """What the model is and what loading did to it; recorded in every cell's result."""

    source: str
    kind: str  # FIELDS, CONFIG_ONLY, WEIGHTS or HUB
    task: str
    architecture: str  # the class that was built, e.g. DistilBertForMaskedLM
    model_type: str
    parameters: int
    #: Weights the checkpoint did not have, so loading initialised them afresh.
    newly_initialized: tuple[str, ...] = ()
    #: Weights the checkpoint had that the model does not use.
    ignored: tuple[str, ...] = ()
    #: Whether the task's head (everything outside the base model) is among the newly initialised weights.
    head_is_new: bool = False
    #: Prefixes of the head's modules that loading initialised (LoRA trains them in full: modules_to_save).
    new_head_modules: tuple[str, ...] = field(default=())
    #: The ``model.*`` fields that overrode the checkpoint's config (``--set model.num_layers=4``).
    overrides: tuple[ShapeOverride, ...] = ()
    #: Embedding rows before and after ``resize_token_embeddings`` (``model.vocab_rows`` with weights).
    resized_rows: tuple[int, int] | None = None

    def notes(self) -> list[str]:
        """One line per fact a reader of the table must know."""
        lines = []
        if self.kind == CONFIG_ONLY:
            lines.append(f"{self.architecture} initialised at random from {self.source}/config.json: no weights were read")
        if self.overrides:
            lines.append(f"the checkpoint's config overridden: {'; '.join(str(o) for o in self.overrides)}")
        if self.resized_rows:
            before, after = self.resized_rows
            change = (f"{after - before:,} new rows, initialised by transformers" if after > before
                      else f"{before - after:,} rows removed")
            lines.append(f"embedding rows {before:,} \N{RIGHTWARDS ARROW} {after:,}: {change}")
        if self.newly_initialized:
            groups = ", ".join(str(group) for group in group_keys(list(self.newly_initialized)))
            why = f": the checkpoint has no {TASKS[self.task]} head" if self.head_is_new else ": not in the checkpoint"
            lines.append(f"newly initialized {groups}{why}")
        if self.ignored:
            groups = ", ".join(str(group) for group in group_keys(list(self.ignored)))
            lines.append(f"ignored from the checkpoint (the {self.architecture} has no such weights): {groups}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_kind": self.kind,
            "task": self.task,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "parameters": self.parameters,
            "newly_initialized": [str(group) for group in group_keys(list(self.newly_initialized))],
            "ignored": [str(group) for group in group_keys(list(self.ignored))],
            "head_is_new": self.head_is_new,
            "overrides": [str(override) for override in self.overrides],
            "load_notes": self.notes(),
        }


@dataclass
class LoadedModel:
    model: PreTrainedModel
    report: LoadReport


def _head_modules(model: torch.nn.Module, keys: list[str]) -> tuple[str, ...]:
    """The top-level modules outside the base model that ``keys`` fall in (the task's head)."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = {key.split(".")[0] for key in keys if prefix and not key.startswith(prefix + ".")}
    return tuple(sorted(heads))


def load_model(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int, seed: int) -> LoadedModel:
    """A fp32 model on the CPU, identical for every cell of a run (same seed, same init)."""
    torch.manual_seed(seed)
    kind = source_kind(model_config.pretrained)
    if kind == FIELDS:
        from transformers.models.bert.modeling_bert import BertForMaskedLM

        model = BertForMaskedLM(bert_config(model_config, tokenizer_size, pad_token_id))
        return LoadedModel(model, _report(model, "random init from the config (no pretrained weights)", kind, MLM))
    task = task_of(read_config(model_config.pretrained), model_config.task, f"'{model_config.pretrained}'")
    overrides = check_model_overrides(model_config)
    if kind == CONFIG_ONLY:
        model = model_class(task).from_config(architecture_config(model_config, tokenizer_size, pad_token_id),
                                              dtype=torch.float32)
        return LoadedModel(model, _report(model, model_config.pretrained, kind, task, overrides=overrides))
    # What may change with weights (check_model_overrides refused the rest): dropout is set on
    # the config as it loads; vocab_rows resizes the embeddings once the weights are in.
    config_values = {attribute: o.value for o in overrides if o.name != "vocab_rows" for attribute, _ in o.replaced}
    try:
        model, info = model_class(task).from_pretrained(
            _target(model_config.pretrained), attn_implementation=model_config.attention, dtype=torch.float32,
            output_loading_info=True, **config_values,
        )
    except Exception as error:  # hub, file-system and format errors all end here
        raise ModelError(
            f"could not load {TASKS[task]} weights from '{model_config.pretrained}' ({first_line(error)}): "
            "pass a local folder holding config.json and the weights, or a reachable hub id"
        ) from None
    rows = model.get_input_embeddings().num_embeddings
    resized = None
    if "vocab_rows" in model_config.overrides:
        # The seed's step: multilingual BERT's embeddings grown to 149,798 rows before training.
        wanted = vocab_rows_for(model_config, tokenizer_size)
        model.resize_token_embeddings(wanted)
        resized, rows = (rows, wanted), wanted
    if rows < tokenizer_size:
        raise ModelError(f"model '{model_config.pretrained}' has {rows} embedding rows but its tokenizer has {tokenizer_size}: "
                         "set model.vocab_rows to at least the tokenizer's size (0 = exactly that)")
    model.config.use_cache = False
    missing = [str(key) for key in info.get("missing_keys", [])]
    unexpected = [str(key) for key in info.get("unexpected_keys", [])]
    return LoadedModel(model, _report(model, model_config.pretrained, kind, task, missing, unexpected, overrides, resized))


def _report(model, source: str, kind: str, task: str, missing=(), unexpected=(), overrides=(), resized=None) -> LoadReport:
    heads = _head_modules(model, list(missing))
    return LoadReport(
        source=source,
        kind=kind,
        task=task,
        architecture=type(model).__name__,
        model_type=model.config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        newly_initialized=tuple(missing),
        ignored=tuple(unexpected),
        head_is_new=bool(heads),
        new_head_modules=heads,
        overrides=tuple(overrides),
        resized_rows=resized,
    )


def build_model(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int, seed: int) -> torch.nn.Module:
    """The model alone (see :func:`load_model` for what loading did)."""
    return load_model(model_config, tokenizer_size, pad_token_id, seed).model


def build_shape_model(model_config: ModelConfig, tokenizer_size: int, pad_token_id: int, seed: int) -> torch.nn.Module:
    """The same architecture with random weights: all a memory estimate needs (no weights are read)."""
    torch.manual_seed(seed)
    task = model_task(model_config)
    config = architecture_config(model_config, tokenizer_size, pad_token_id)
    if source_kind(model_config.pretrained) == FIELDS:
        from transformers.models.bert.modeling_bert import BertForMaskedLM

        return BertForMaskedLM(config)
    return model_class(task).from_config(config, dtype=torch.float32)
