"""Run configuration: frozen dataclasses, TOML presets and ``--set key=value`` overrides.

The dataclass defaults are the seed's setup (``configs/seed.toml`` states them again,
and a test keeps the two equal). A preset is a TOML file whose sections mirror the
dataclasses; anything it leaves out keeps its default. Unknown keys and badly typed
values are errors, never silently ignored, because a typo in a benchmark recipe
produces numbers for a run nobody asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, SizeError
from .units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


#: The cells ``--matrix`` runs: the reference study's table (the 2022 write-up, preset "seed"),
#: in its order, then LoRA.
REFERENCE_MATRIX = ("baseline", "1", "2", "3", "4", "1+2+3", "1+2+4", "lora")

#: The training objectives ``data.objective`` accepts, and what each means (table footers
#: and errors say it; ``data/objective.py`` implements them).
OBJECTIVES: dict[str, str] = {
    "seed": "the seed's: labels on every position, padding included; [MASK] only; masks drawn once per run",
    "mlm": "standard masked-LM: labels at the masked positions only; 80/10/10; masks drawn afresh each epoch",
    "clm": "a causal LM's: next-token loss at every real token, padding ignored",
}

#: Which objectives train which task (``model.task``): a causal LM has one, a masked-LM two.
OBJECTIVES_OF_TASK: dict[str, tuple[str, ...]] = {"mlm": ("seed", "mlm"), "clm": ("clm",)}


#: The attention kernels ``model.attention`` accepts (transformers' names), and what each keeps.
ATTENTION_KERNELS: dict[str, str] = {
    "eager": "the seed's 2022 kernel: each layer keeps its attention probabilities for backward",
    "sdpa": "torch's scaled_dot_product_attention: fused kernels keep far less for backward on a GPU",
}

#: chunked-ce's cross-entropy kernels (``strategy.ce_kernel``): its own chunks, and two fused ones.
CE_KERNELS = ("torch", "liger", "cce")


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its documentation attached (shown by ``presets``)."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in frozen config")
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """The network that is fine-tuned."""

    pretrained: str = setting(
        "",
        "The model (--model): a hub id, a folder with weights, or a folder with only config.json (a random init of "
        "that architecture, no weights read); empty = the seed's BERT from the fields below, random init.",
    )
    task: str = setting(
        "auto",
        "'auto' (from the checkpoint's architectures), 'mlm' (AutoModelForMaskedLM) or 'clm' (AutoModelForCausalLM).",
    )
    vocab_rows: int = setting(
        149_798,
        "Embedding rows. The seed extended multilingual BERT to 149,798; 0 = the tokenizer's size. "
        "Rows beyond the tokenizer stay, so memory and time match the seed. With --model, set explicitly: "
        "resize_token_embeddings(N) on a checkpoint, vocab_size on a config.json.",
    )
    # The shape fields below build the seed's BERT; with --model, each one set explicitly
    # overrides the checkpoint's config instead (docs/your-model.md#shape-overrides).
    hidden_size: int = setting(768, "Hidden width (BERT-base: 768).")
    num_layers: int = setting(12, "Transformer layers (BERT-base: 12).")
    num_heads: int = setting(12, "Attention heads (BERT-base: 12).")
    intermediate_size: int = setting(3072, "Feed-forward width (BERT-base: 3072).")
    max_position_embeddings: int = setting(512, "Position embedding rows.")
    dropout: float = setting(0.1, "Hidden and attention dropout probability.")
    attention: str = setting(
        "eager",
        "Attention kernel passed to transformers: 'eager' (what the seed's 2022 stack ran) or 'sdpa'.",
    )
    #: Recorded, not set: which shape fields (SHAPE_FIELDS) were set for *this* model, by
    #: --set or by the preset that names it. With --model only these override the checkpoint's
    #: config; the others keep their defaults and mean nothing for it. See ``_model_changes``.
    overrides: tuple[str, ...] = field(default=(), metadata={"recorded": True})


#: The model.* fields that give the network's shape. Without --model they build the seed's
#: BERT; with it, each one set for that model overrides the checkpoint's config
#: (``modeling.shape_overrides`` maps it to the architecture's own attribute).
SHAPE_FIELDS = ("vocab_rows", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "dropout")


def model_overrides(model: ModelConfig) -> tuple[str, ...]:
    """``model.num_layers=4`` for each shape field that overrides a --model's config; none
    without --model, where the fields build the seed's BERT."""
    return tuple(f"model.{name}={getattr(model, name)}" for name in model.overrides) if model.pretrained else ()


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and masking."""

    train_file: str = setting("", "Text file, one sentence per line; empty = the embedded stdlib-docstring corpus.")
    eval_file: str = setting("", "Eval text file; empty = hold out eval sentences from the training source.")
    train_sentences: int = setting(10_000, "Training sentences taken from the corpus (0 = all lines of --train-file).")
    eval_sentences: int = setting(110, "Eval sentences.")
    max_length: int = setting(128, "Tokens per sequence, padded and truncated.")
    tokenizer_vocab_size: int = setting(
        30_522, "Vocabulary of the WordPiece tokenizer trained on the training split (ignored with model.pretrained)."
    )
    objective: str = setting(
        "seed",
        "Training objective. 'seed': the seed's own (labels on every position, padding included; chosen tokens all "
        "become [MASK]; masks drawn once per run), so its 89% token accuracy can be compared. 'mlm': standard "
        "masked-LM (labels at masked positions only; 80/10/10; masks drawn afresh each epoch); sparse-head needs it. "
        "'clm': next-token prediction, the one objective of a causal LM.",
    )
    mask_probability: float = setting(0.15, "Fraction of non-special tokens chosen for masking.")
    cache_dir: str = setting("", "Where tokenizers and tokenized tensors are cached; empty = $GPUTECH_BENCH_CACHE or ~/.cache/gputech-bench.")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe, shared by every cell of a matrix."""

    batch_size: int = setting(32, "Samples per optimizer step.")
    epochs: int = setting(3, "Passes over the training set.")
    max_steps: int = setting(0, "Stop after this many optimizer steps in total (0 = no limit); epoch time is then extrapolated.")
    lr: float = setting(3e-5, "Peak learning rate.")
    adam_eps: float = setting(1e-8, "Adam epsilon.")
    weight_decay: float = setting(0.0, "AdamW weight decay (0.0 is transformers.AdamW's default, which the seed used).")
    warmup_ratio: float = setting(0.1, "Linear warm-up over this fraction of the steps run, then linear decay to 0.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = none). Strategy 4 never clips, as in the seed.")
    seed: int = setting(222, "Seed for weights, data order and masks: every cell sees the same batches and masks.")
    eval_batch_size: int = setting(32, "Batch size for evaluation.")
    track_memory: bool = setting(
        True, "Run the first optimizer step under torch's MemTracker for a per-category breakdown (never timed)."
    )


@dataclass(frozen=True)
class StrategyConfig:
    """Knobs of the individual strategies; the defaults are the seed's."""

    micro_batch_size: int = setting(8, "Strategy 2: samples per micro-batch; accumulation steps = batch_size / this.")
    accumulation_loss: str = setting(
        "seed",
        "Strategy 2: 'seed' divides each micro-batch loss by the step count (the seed's rule); "
        "'token-weighted' weights by masked tokens, which reproduces the full batch's gradient exactly.",
    )
    adam8bit_betas: tuple[float, float] = setting((0.9, 0.995), "Strategy 3: betas of bitsandbytes Adam8bit, as in the seed.")
    half_dtype: str = setting(
        "auto",
        "Strategy 4: dtype of the compute copy: 'auto' = float16 on CUDA (the seed) and bfloat16 on CPU "
        "(fp16 matmul is ~40x slower there), or 'float16' / 'bfloat16'.",
    )
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha.")
    lora_dropout: float = setting(0.1, "LoRA dropout.")
    lora_targets: tuple[str, ...] = setting(
        (),
        "Module names that get LoRA adapters (lora, qlora); empty = peft's default for the model type "
        "(BERT, RoBERTa: query,value; Llama: q_proj,v_proj; DistilBERT: q_lin,v_lin).",
    )
    ce_chunk_tokens: int = setting(
        512,
        "chunked-ce: positions whose logits exist at once. 512 rows x the seed's 149,798-row vocabulary is 0.29 GiB of "
        "fp32 logits (an eighth of the full 2.3 GiB): the largest chunk at which the head no longer sets the seed's "
        "traced peak (1,024: 0.62x the baseline's; 512 and 256: 0.55x), in matmuls still large enough to keep a GPU busy.",
    )
    ce_kernel: str = setting(
        "torch",
        "chunked-ce: 'torch' (its own chunks, recomputed in backward; any device), 'liger' (Liger Kernel's fused "
        "linear cross-entropy) or 'cce' (Cut Cross-Entropy); the last two on CUDA only, when installed.",
    )
    offload_min_bytes: int = setting(
        1024,
        "offload-activations: saved tensors (their storages) smaller than this many bytes stay on the device; "
        "1024 is torchtune's threshold: a copy of less costs more in launches than it frees.",
    )
    stochastic_rounding: bool = setting(
        False,
        "bf16-weights: round each bf16 weight update stochastically (unbiased: updates under half a bf16 step "
        "survive on average) with bf16-weights' own AdamW; off = round to nearest, which loses them. "
        "Refused beside another strategy that builds the optimizer (3, adam4bit).",
    )
    adam8bit_backend: str = setting(
        "bitsandbytes",
        "Strategy 3: whose 8-bit optimizer steps: 'bitsandbytes' (Adam8bit, the seed's) or 'torchao' "
        "(torchao.optim.AdamW8bit), to compare the two on one card; paged-adam8bit is bitsandbytes' whatever this says.",
    )


@dataclass(frozen=True)
class BenchConfig:
    """Everything one cell needs, resolved and saved with its result."""

    preset: str = setting("seed", "Name of the preset this config started from.")
    device: str = setting("auto", "'auto' (CUDA when available), 'cuda' or 'cpu'.")
    gpu_memory_limit: str = setting(
        "", "Emulate a smaller card, e.g. '24GiB': the cell may use this much GPU memory, CUDA context included."
    )
    memory_snapshot: bool = setting(False, "Record the CUDA allocator's history and write a memory_viz snapshot per cell.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
}
TOP_LEVEL_KEYS = ("preset", "device", "gpu_memory_limit", "memory_snapshot")
PRESET_META_KEYS = ("description",)


# --------------------------------------------------------------------------- values


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    return "a comma-separated list"


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or explain why not."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        # An empty string is the empty list (``--set strategy.lora_targets=``), not one empty name.
        items = ([] if not value.strip() else value.split(",")) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} expects a comma-separated list, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0]
        coerced = tuple(coerce(key, item_type, v.strip() if isinstance(v, str) else v) for v in items)
        if args[-1] is not Ellipsis and len(coerced) != len(args):
            raise ConfigError(f"{key} expects {len(args)} comma-separated values, got {len(coerced)}: {value!r}")
        return coerced
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} expects {_type_name(tp)}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}': {hint}")


def _is_recorded(f: dataclasses.Field) -> bool:
    """A field the config layer records (where a value came from), never one a user sets."""
    return bool(f.metadata.get("recorded"))


def all_keys() -> list[str]:
    keys = list(TOP_LEVEL_KEYS)
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in fields(cls) if not _is_recorded(f)]
    return keys


# --------------------------------------------------------------------------- building


def _apply_section(current: Any, section: str, values: dict[str, Any]) -> Any:
    cls = type(current)
    types_by_name = _field_types(cls)
    changes = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in types_by_name:
            raise _unknown_key(key, all_keys())
        changes[name] = coerce(key, types_by_name[name], value)
    if section == "model":
        changes = _model_changes(current, changes)
    return replace(current, **changes)


def _model_changes(current: ModelConfig, changes: dict[str, Any]) -> dict[str, Any]:
    """Shape fields belong to the model they were set for, and the record says which were set.

    Naming another model resets the shape fields set for the previous one: the cpu preset's
    2-layer BERT says nothing about a Llama given with --model, and must not shrink it. Every
    shape field set here, together with or after the model it shapes, is recorded in
    ``overrides``, so that with --model exactly the user's (or that model's preset's) values
    override the checkpoint's config and none of the defaults do. A saved config (config.json,
    the worker's --config) carries its record and is restored as it was.
    """
    if "overrides" in changes:
        unknown = sorted(set(changes["overrides"]) - set(SHAPE_FIELDS))
        if unknown:
            raise ConfigError(f"model.overrides names {', '.join(unknown)}, which are not shape fields "
                              f"({', '.join(SHAPE_FIELDS)}): fix or remove the saved config")
        return changes
    recorded = current.overrides
    set_here = {name for name in changes if name in SHAPE_FIELDS}
    if changes.get("pretrained", current.pretrained) != current.pretrained:
        defaults = ModelConfig()
        changes = {**{name: getattr(defaults, name) for name in SHAPE_FIELDS}, **changes}
        recorded = ()
    overrides = tuple(name for name in SHAPE_FIELDS if name in recorded or name in set_here)
    return {**changes, "overrides": overrides}


def apply_mapping(config: BenchConfig, mapping: dict[str, Any], origin: str = "") -> BenchConfig:
    """Apply a nested mapping (a parsed TOML preset) on top of ``config``."""
    where = f" in {origin}" if origin else ""
    for key, value in mapping.items():
        if key in PRESET_META_KEYS:
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}]{where} must be a table of settings")
            try:
                config = replace(config, **{key: _apply_section(getattr(config, key), key, value)})
            except ConfigError as error:
                raise ConfigError(f"{error}{where}") from None
        elif key in TOP_LEVEL_KEYS:
            config = replace(config, **{key: coerce(key, _field_types(BenchConfig)[key], value)})
        else:
            raise ConfigError(f"{_unknown_key(key, all_keys())}{where}")
    return validate(config)


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (for example train.epochs=1), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(config: BenchConfig, overrides: list[str] | tuple[str, ...]) -> BenchConfig:
    """Apply ``section.key=value`` strings, as given to ``--set``."""
    nested: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in TOP_LEVEL_KEYS:
            nested[key] = value
            continue
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise _unknown_key(key, all_keys())
        if f"{section}.{name}" not in all_keys() and name in _field_types(SECTIONS[section]):
            raise ConfigError(f"{key} is recorded by gputech-bench, not set: set the model.* shape fields themselves "
                              f"({', '.join(SHAPE_FIELDS)})")
        nested.setdefault(section, {})[name] = value
    return apply_mapping(config, nested)


# --------------------------------------------------------------------------- validation


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise ConfigError(f"{key} must be {bound}, got {value}")


def validate(config: BenchConfig) -> BenchConfig:
    """Range checks that a type alone cannot express."""
    m, d, t, s = config.model, config.data, config.train, config.strategy
    for key, value in (
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads),
        ("model.intermediate_size", m.intermediate_size),
        ("data.eval_sentences", d.eval_sentences),
        ("data.max_length", d.max_length),
        ("train.batch_size", t.batch_size),
        ("train.epochs", t.epochs),
        ("train.lr", t.lr),
        ("train.eval_batch_size", t.eval_batch_size),
        ("strategy.micro_batch_size", s.micro_batch_size),
        ("strategy.lora_r", s.lora_r),
        ("strategy.ce_chunk_tokens", s.ce_chunk_tokens),
    ):
        _positive(key, value)
    for key, value in (
        ("model.vocab_rows", m.vocab_rows),
        ("data.train_sentences", d.train_sentences),
        ("train.max_steps", t.max_steps),
        ("train.max_grad_norm", t.max_grad_norm),
        ("train.weight_decay", t.weight_decay),
        ("strategy.offload_min_bytes", s.offload_min_bytes),
    ):
        _positive(key, value, allow_zero=True)
    # Cross-checks of shape fields hold where both fields shape the model: the seed's BERT, or
    # both set for a --model (with one alone, transformers checks it against the checkpoint's).
    def shapes(*names: str) -> bool:
        return not m.pretrained or all(name in m.overrides for name in names)

    if shapes("hidden_size", "num_heads") and m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    if shapes("max_position_embeddings") and d.max_length > m.max_position_embeddings:
        raise ConfigError(
            f"data.max_length ({d.max_length}) exceeds model.max_position_embeddings ({m.max_position_embeddings})"
        )
    for key, value in (("model.dropout", m.dropout), ("strategy.lora_dropout", s.lora_dropout), ("train.warmup_ratio", t.warmup_ratio)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0.0 < d.mask_probability < 1.0:
        raise ConfigError(f"data.mask_probability must be in (0, 1), got {d.mask_probability}")
    if d.tokenizer_vocab_size < 100:
        raise ConfigError(f"data.tokenizer_vocab_size must be at least 100, got {d.tokenizer_vocab_size}")
    choices = {
        "device": (config.device, ("auto", "cuda", "cpu")),
        "model.attention": (m.attention, tuple(ATTENTION_KERNELS)),
        "model.task": (m.task, ("auto", "mlm", "clm")),
        "data.objective": (d.objective, tuple(OBJECTIVES)),
        "strategy.accumulation_loss": (s.accumulation_loss, ("seed", "token-weighted")),
        "strategy.half_dtype": (s.half_dtype, ("auto", "float16", "bfloat16")),
        "strategy.ce_kernel": (s.ce_kernel, CE_KERNELS),
        "strategy.adam8bit_backend": (s.adam8bit_backend, ("bitsandbytes", "torchao")),
    }
    for key, (choice, allowed) in choices.items():
        if choice not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {choice!r}")
    if config.gpu_memory_limit:
        try:
            parse_size(config.gpu_memory_limit)
        except SizeError as error:
            raise ConfigError(f"gpu_memory_limit: {error}") from None
        if config.device == "cpu":
            raise ConfigError("gpu_memory_limit needs a CUDA device: drop it, or run with --device cuda")
    return config


# --------------------------------------------------------------------------- presets


def presets_dir() -> Path:
    """Presets ship inside the wheel; in a source checkout they are the top-level configs/."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def read_preset(name: str) -> dict[str, Any]:
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(preset_names()) or '(none found)'}")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"preset file {path} is not valid TOML: {error}") from None


def load_preset(name: str) -> BenchConfig:
    mapping = read_preset(name)
    # A preset's model folder (e.g. models/tiny-llama, a config.json) is relative to the presets.
    model = mapping.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and model["pretrained"].startswith("models/"):
        mapping = {**mapping, "model": {**model, "pretrained": str(presets_dir() / model["pretrained"])}}
    config = apply_mapping(BenchConfig(), mapping, origin=f"preset '{name}'")
    return replace(config, preset=name)


def default_preset_name(cuda_available: bool) -> str:
    """The seed's full recipe on a GPU; a 2-layer shrink of it on a CPU."""
    return "seed" if cuda_available else "cpu"


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(config: BenchConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> BenchConfig:
    """Rebuild a config from ``to_dict`` output (for example the worker's --config file)."""
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a JSON object")
    model = data.get("model")
    if isinstance(model, dict) and "overrides" not in model:
        # Written before the record existed, when no shape field overrode a --model's config.
        data = {**data, "model": {**model, "overrides": []}}
    return apply_mapping(BenchConfig(), data)


def config_changes(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every setting that differs between two resolved
    configs (as ``to_dict`` or a saved config.json holds them); lists and tuples compare by content."""
    if isinstance(a, dict) and isinstance(b, dict):
        changes = []
        for key in sorted(set(a) | set(b)):
            changes += config_changes(a.get(key), b.get(key), f"{prefix}{key}.")
        return changes
    same_sequence = isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return [(prefix.rstrip("."), a, b)] if a != b and not same_sequence else []


def describe_fields() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every setting, for ``--help`` and ``presets``."""
    rows: list[tuple[str, Any, str]] = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if not _is_recorded(f):
                rows.append((f"{section}.{f.name}", f.default, f.metadata.get("help", "")))
    return rows

