"""Turn the data config into tensors: corpus, tokenizer, cached tokens and the fixed eval masks
(masked as the run's objective trains)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BenchConfig
from ..training.evaluate import EvalSet
from ..training.seeding import generator
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


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSplit
    eval_set: EvalSet
    masking: MaskingSpec
    tokenizer_size: int
    pad_token_id: int
    info: dict[str, Any]


def cache_dir_for(config: BenchConfig) -> Path:
    return Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()


#: Files any saved Hugging Face tokenizer leaves in its folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def _without_tokenizer(pretrained: str) -> bool:
    """A local model folder that holds no tokenizer (a shape-only folder with just config.json):
    the run trains the WordPiece on its corpus, as for the seed's BERT. A hub id or a folder
    with tokenizer files loads its own."""
    folder = Path(pretrained).expanduser()
    return folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES)


def prepare_data(config: BenchConfig) -> PreparedData:
    settings, seed = config.data, config.train.seed
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

    if config.model.pretrained and not _without_tokenizer(config.model.pretrained):
        tokenizer = load_pretrained_tokenizer(config.model.pretrained)
        tokenizer_kind = f"pretrained ({config.model.pretrained})"
    else:
        tokenizer = train_wordpiece(corpus.train, settings.tokenizer_vocab_size, cache, corpus.fingerprint)
        tokenizer_kind = f"WordPiece trained on the training split (target vocab {settings.tokenizer_vocab_size})"
    fingerprint = tokenizer_fingerprint(tokenizer)
    train = tokenize_cached(corpus.train, tokenizer, settings.max_length, cache, corpus.fingerprint, fingerprint, "train")
    held_out = tokenize_cached(corpus.eval, tokenizer, settings.max_length, cache, corpus.fingerprint, fingerprint, "eval")

    masking = MaskingSpec(
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
        probability=settings.mask_probability,
    )
    eval_masks = apply_objective(settings.objective, held_out.input_ids, masking, generator(seed, "eval-masks"),
                                 held_out.attention_mask)
    eval_set = EvalSet(eval_masks.input_ids, eval_masks.labels, held_out.input_ids, held_out.attention_mask, eval_masks.masked)
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
