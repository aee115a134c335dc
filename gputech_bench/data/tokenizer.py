"""BERT-style WordPiece tokenizers: train one on the corpus, or load a pretrained one.

tokenizers and transformers are imported where they are used, not when this module is:
importing transformers costs about a second, and the data package (which imports this
module) is also read by code that never tokenises (constants, the estimate's setup).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError, error_line
from ..files import fingerprint_of, write_cache_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order fixes the ids: [PAD]=0 (what BERT configs assume), then UNK=1, CLS=2, SEP=3, MASK=4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
# Bump when the training recipe changes, so cached tokenizers from the old recipe are ignored.
WORDPIECE_RECIPE_VERSION = 1


def _bert_pipeline(tokenizer: Tokenizer) -> None:
    """Give `tokenizer` the uncased-BERT normaliser, pre-tokeniser and decoder."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)


def _continuation_tokens(tokenizer: Tokenizer, sentences: Sequence[str]) -> list[str]:
    """Sorted "##x" tokens for every character that occurs inside a word (not first).

    Why this exists: tokenizers' WordPiece/BPE trainer creates these tokens while
    iterating a hash map with a per-process random seed, so their ids, and with
    them the merge tie-breaks, change from run to run (huggingface/tokenizers#1794,
    still open in 0.23). Pre-registering them in a fixed order makes training
    deterministic.
    """
    inner_characters: set[str] = set()
    normalize, pre_tokenize = tokenizer.normalizer.normalize_str, tokenizer.pre_tokenizer.pre_tokenize_str
    for sentence in sentences:
        for word, _span in pre_tokenize(normalize(sentence)):
            inner_characters.update(word[1:])
    return [CONTINUATION_PREFIX + character for character in sorted(inner_characters)]


def _train_backend(sentences: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a deterministic uncased WordPiece `tokenizers.Tokenizer` on `sentences`."""
    from tokenizers import Tokenizer, models, processors, trainers

    scratch = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX))
    _bert_pipeline(scratch)
    # Passing the continuation tokens as "special tokens" is the only way to hand the
    # trainer ids it must use; they become ordinary vocab entries in the rebuild below.
    pinned = list(SPECIAL_TOKENS) + _continuation_tokens(scratch, sentences)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=pinned,
        continuing_subword_prefix=CONTINUATION_PREFIX,
        show_progress=False,
    )
    scratch.train_from_iterator(list(sentences), trainer=trainer, length=len(sentences))

    # Rebuild from the learned vocab so only the five real special tokens are "added
    # tokens": otherwise "##a" would be matched verbatim in raw text and dropped by
    # skip_special_tokens when decoding.
    vocab = scratch.get_vocab(with_added_tokens=False)
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX))
    _bert_pipeline(tokenizer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tokenizer


def _wrap_for_transformers(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # PreTrainedTokenizerFast (an alias of TokenizersBackend in transformers 5) keeps
    # the backend we built; BertTokenizerFast (alias of BertTokenizer) would also
    # work but overwrites the post-processor with its own after construction.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
    )


def wordpiece_cache_file(cache_dir: Path, corpus_fingerprint: str, vocab_size: int) -> Path:
    """Where the tokenizer trained for this corpus and vocab size is cached."""
    return cache_dir / "tokenizers" / f"wordpiece-r{WORDPIECE_RECIPE_VERSION}-{corpus_fingerprint}-v{vocab_size}.json"


def _load_cached_backend(path: Path) -> Tokenizer | None:
    """The cached tokenizer, or None if missing or unreadable (then it is retrained)."""
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # tokenizers raises plain Exception on malformed JSON
        return None


def train_wordpiece(
    sentences: Sequence[str],
    vocab_size: int,
    cache_dir: Path,
    corpus_fingerprint: str,
) -> PreTrainedTokenizerFast:
    """An uncased BERT WordPiece tokenizer trained on `sentences`, cached by corpus + vocab size.

    Deterministic: the same sentences and vocab_size always give the same vocab.
    The real vocab can be smaller than `vocab_size` when the corpus runs out of
    merges (10,000 stdlib sentences top out near 11,000), so size the model's
    embeddings with len(tokenizer), not `vocab_size`.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise DataError(
            f"vocab size {vocab_size} leaves no room beyond the {len(SPECIAL_TOKENS)} special tokens: "
            f"ask for a vocab size of a few thousand"
        )
    if not sentences:
        raise DataError("cannot train a tokenizer on zero sentences: pass a non-empty training corpus")
    cache_file = wordpiece_cache_file(Path(cache_dir), corpus_fingerprint, vocab_size)
    backend = _load_cached_backend(cache_file)
    if backend is None:
        backend = _train_backend(sentences, vocab_size)
        write_cache_file(cache_file, backend.to_str().encode("utf-8"))
    return _wrap_for_transformers(backend)


# --- pretrained tokenizers ---------------------------------------------------------------

# What huggingface_hub accepts as a repo id: "name" or "owner/name", word chars, '.', '-'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".")


def load_pretrained_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained(path_or_id), with a one-line DataError on any failure.

    Local folders and models already in the Hugging Face cache load without touching
    the network; only a hub id missing from the cache is downloaded. (Without network
    that attempt retries for ~50 s before failing; set HF_HUB_OFFLINE=1 to fail fast.)
    """
    local = Path(path_or_id).expanduser()
    if not local.exists() and not _looks_like_hub_id(path_or_id):
        raise DataError(
            f"tokenizer folder '{path_or_id}' not found (and it is not a Hugging Face model id): "
            f"pass an existing tokenizer folder or a model id such as 'bert-base-uncased'"
        )
    target = str(local) if local.exists() else path_or_id
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(target, local_files_only=True)
    except Exception as error:
        last_error: Exception = error
    if not local.exists():
        try:
            return AutoTokenizer.from_pretrained(target)
        except Exception as error:
            last_error = error
    raise DataError(
        f"could not load tokenizer '{path_or_id}' ({error_line(last_error)}): pass a folder saved with "
        f"save_pretrained() or a model id that can be downloaded or is already in the Hugging Face cache"
    ) from last_error


# --- fingerprints ------------------------------------------------------------------------

# Runtime state, not identity: transformers rewrites these in the backend on every
# call with padding/truncation arguments, which would change the hash mid-run.
_VOLATILE_BACKEND_KEYS = ("truncation", "padding")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16-hex-char hash of what determines the token ids a tokenizer produces.

    Covers the backend JSON (vocab, normaliser, pre-tokeniser, post-processor, added
    tokens) minus padding/truncation state, plus the special-token ids. Stable across
    processes and unaffected by calling the tokenizer.
    """
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    state: dict[str, Any]
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in _VOLATILE_BACKEND_KEYS:
            state.pop(key, None)
    else:
        # Slow (pure-Python) tokenizers have no backend JSON; the vocab is the next best identity.
        vocab = tokenizer.get_vocab()
        state = {"class": type(tokenizer).__name__, "vocab": sorted(vocab.items(), key=lambda item: item[1])}
    if not isinstance(tokenizer, Tokenizer):
        state["special_token_ids"] = {
            role: getattr(tokenizer, f"{role}_token_id", None) for role in ("pad", "unk", "cls", "sep", "mask")
        }
    return fingerprint_of(state)
