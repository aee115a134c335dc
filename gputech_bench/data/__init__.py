"""Data layer: corpus, tokenizer, the training objective's masking and token caching.

Everything a user can get wrong raises DataError with a one-line message.
"""

from __future__ import annotations

from ..errors import DataError
from .cache import TokenizedSplit, tokenize_cached
from .corpus import Corpus, default_cache_dir, embedded_corpus, load_corpus_files, stdlib_sentences
from .masking import IGNORE_INDEX, MaskingSpec, mask_tokens
from .objective import MaskedTokens, apply_objective, masks_are_static
from .tokenizer import load_pretrained_tokenizer, tokenizer_fingerprint, train_wordpiece

__all__ = [
    "IGNORE_INDEX",
    "Corpus",
    "DataError",
    "MaskedTokens",
    "MaskingSpec",
    "TokenizedSplit",
    "apply_objective",
    "default_cache_dir",
    "embedded_corpus",
    "load_corpus_files",
    "load_pretrained_tokenizer",
    "mask_tokens",
    "masks_are_static",
    "stdlib_sentences",
    "tokenize_cached",
    "tokenizer_fingerprint",
    "train_wordpiece",
]
