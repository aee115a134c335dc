"""Tokenize a split once and keep the padded id tensors on disk for later runs."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..files import fingerprint_of, write_cache_file

# Bump when the stored layout or the tokenization call changes.
TOKEN_CACHE_FORMAT_VERSION = 1
# [CLS] + [SEP] alone take two positions.
MIN_MAX_LENGTH = 2


@dataclass(frozen=True, eq=False)  # eq=False: tensor == tensor is elementwise, not a bool
class TokenizedSplit:
    """Padded, truncated token ids of one split; both tensors are LongTensor [N, max_length]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must be equal 2-D shapes"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def token_cache_file(
    cache_dir: Path, corpus_fingerprint: str, tokenizer_fp: str, max_length: int, split_name: str
) -> Path:
    """Cache location; the key covers everything that changes the tensors."""
    key = fingerprint_of([TOKEN_CACHE_FORMAT_VERSION, corpus_fingerprint, tokenizer_fp, max_length, split_name])
    return cache_dir / "tokens" / f"{key}.pt"


def _tokenize(sentences: Sequence[str], tokenizer: Any, max_length: int) -> TokenizedSplit:
    encoded = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    return TokenizedSplit(
        input_ids=encoded["input_ids"].to(torch.long).contiguous(),
        attention_mask=encoded["attention_mask"].to(torch.long).contiguous(),
    )


def _load_cached(path: Path, expected_rows: int, max_length: int) -> TokenizedSplit | None:
    """The cached split, or None if missing, corrupt or not the expected shape (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        split = TokenizedSplit(input_ids=payload["input_ids"], attention_mask=payload["attention_mask"])
    except Exception:  # truncated zip, unpickling error, wrong types: all mean "rebuild"
        return None
    expected_shape = (expected_rows, max_length)
    if tuple(split.input_ids.shape) != expected_shape or split.input_ids.dtype != torch.long:
        return None
    if split.attention_mask.dtype != torch.long:
        return None
    return split


def tokenize_cached(
    sentences: Sequence[str],
    tokenizer: Any,
    max_length: int,
    cache_dir: Path,
    corpus_fingerprint: str,
    tokenizer_fp: str,
    split_name: str,
) -> TokenizedSplit:
    """Tokenize `sentences` (padded/truncated to `max_length`), reusing the on-disk cache.

    The cache key is corpus fingerprint + tokenizer fingerprint + max_length + split
    name, so callers must pass the fingerprints that belong to `sentences` and
    `tokenizer`. A corrupt or mismatched cache file is rebuilt, never fatal.
    """
    if max_length < MIN_MAX_LENGTH:
        raise DataError(
            f"max sequence length {max_length} is too short for [CLS] and [SEP]: use at least 2 (typically 64-512)"
        )
    if not sentences:
        raise DataError(
            f"the {split_name} split has no sentences: pass a corpus with at least one {split_name} sentence"
        )
    path = token_cache_file(Path(cache_dir), corpus_fingerprint, tokenizer_fp, max_length, split_name)
    cached = _load_cached(path, len(sentences), max_length)
    if cached is not None:
        return cached
    split = _tokenize(sentences, tokenizer, max_length)
    buffer = io.BytesIO()
    torch.save({"input_ids": split.input_ids, "attention_mask": split.attention_mask}, buffer)
    write_cache_file(path, buffer.getvalue())
    return split
