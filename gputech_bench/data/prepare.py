"""Turn the data config into tensors: corpus, tokenizer, cached tokens and the fixed eval masks
(masked as the run's objective trains)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import OBJECTIVES_OF_TASK, BenchConfig
from ..errors import DataError
from ..modeling import CONFIG_ONLY, FIELDS, TASKS, model_task, source_kind
from . import (
    MaskingSpec,
    TokenizedSplit,
    apply_objective,
    default_cache_dir,
    embedded_corpus,
    load_corpus_files,
    load_pretrained_tokenizer,
    tokenize_cached,
    tokenizer_fingerprint,
    train_wordpiece,
)
from .seeding import generator


@dataclass(frozen=True)
class EvalSet:
    """Eval sentences masked once, with a fixed seed, so every cell is scored on the same task."""

    input_ids: torch.Tensor  # masked
    labels: torch.Tensor  # what the objective's loss scores: IGNORE_INDEX where nothing is
    original_ids: torch.Tensor
    attention_mask: torch.Tensor
    masked: torch.Tensor  # bool: the positions chosen for masking, whatever the objective
    objective: str = "seed"

    @property
    def next_token(self) -> bool:
        """Whether the set scores a causal LM's next-token predictions."""
        return self.objective == "clm"


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSplit
    eval_set: EvalSet
    masking: MaskingSpec | None  # None for a causal LM: nothing is masked
    tokenizer_size: int
    pad_token_id: int
    info: dict[str, Any]


def cache_dir_for(config: BenchConfig) -> Path:
    return Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()


#: Files that say a model folder carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")


def has_own_tokenizer(pretrained: str) -> bool:
    """Whether ``--model`` brings a tokenizer: a checkpoint does; a folder with only config.json
    does not, and then a WordPiece is trained on the corpus, as for the seed's BERT."""
    kind = source_kind(pretrained)
    if kind == FIELDS:
        return False
    if kind == CONFIG_ONLY:
        return any((Path(pretrained).expanduser() / name).is_file() for name in TOKENIZER_FILES)
    return True


def check_objective(config: BenchConfig, task: str) -> None:
    """A masked-LM trains under seed or mlm, a causal LM under clm: anything else would train
    one model on the other's task."""
    if config.data.objective not in OBJECTIVES_OF_TASK[task]:
        raise DataError(
            f"data.objective={config.data.objective} does not train a {TASKS[task]}: set data.objective to "
            f"{' or '.join(OBJECTIVES_OF_TASK[task])}"
        )


def prepare_data(config: BenchConfig) -> PreparedData:
    settings, seed = config.data, config.train.seed
    task = model_task(config.model)
    check_objective(config, task)
    cache = cache_dir_for(config)
    if settings.train_file:
        corpus = load_corpus_files(
            Path(settings.train_file),
            Path(settings.eval_file) if settings.eval_file else None,
            settings.train_sentences or None,
            settings.eval_sentences,
            seed,
        )
    else:
        corpus = embedded_corpus(settings.train_sentences, settings.eval_sentences, seed, cache)

    if has_own_tokenizer(config.model.pretrained):
        tokenizer = load_pretrained_tokenizer(config.model.pretrained)
        tokenizer_kind = f"pretrained ({config.model.pretrained})"
        if tokenizer.pad_token_id is None:  # most causal-LM tokenizers have none; padding carries no label anyway
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer_kind += "; pads with its end-of-sequence token"
    else:
        tokenizer = train_wordpiece(corpus.train, settings.tokenizer_vocab_size, cache, corpus.fingerprint)
        tokenizer_kind = f"WordPiece trained on the training split (target vocab {settings.tokenizer_vocab_size})"
    fingerprint = tokenizer_fingerprint(tokenizer)
    train = tokenize_cached(corpus.train, tokenizer, settings.max_length, cache, corpus.fingerprint, fingerprint, "train")
    held_out = tokenize_cached(corpus.eval, tokenizer, settings.max_length, cache, corpus.fingerprint, fingerprint, "eval")

    masking = None if task != "mlm" else MaskingSpec(
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
        probability=settings.mask_probability,
    )
    eval_masks = apply_objective(settings.objective, held_out.input_ids, masking, generator(seed, "eval-masks"),
                                 held_out.attention_mask)
    eval_set = EvalSet(eval_masks.input_ids, eval_masks.labels, held_out.input_ids, held_out.attention_mask,
                       eval_masks.masked, settings.objective)
    info = {
        "corpus_source": corpus.source,
        "corpus_fingerprint": corpus.fingerprint,
        "train_sentences": len(corpus.train),
        "train_sentences_repeated": corpus.repeated_train,
        "eval_sentences": len(corpus.eval),
        "tokenizer": tokenizer_kind,
        "tokenizer_size": len(tokenizer),
        "tokenizer_fingerprint": fingerprint,
        "max_length": settings.max_length,
        "objective": settings.objective,
        "cache_dir": str(cache),
    }
    return PreparedData(train, eval_set, masking, len(tokenizer), tokenizer.pad_token_id, info)
