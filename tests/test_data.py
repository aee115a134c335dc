"""Tests for gputech_bench.data: corpus, tokenizer, masking and token cache.

Every cache lives under pytest's tmp_path; nothing touches the user's home or the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_result

from gputech_bench.data import (
    IGNORE_INDEX,
    Corpus,
    MaskingSpec,
    TokenizedSplit,
    default_cache_dir,
    embedded_corpus,
    load_corpus_files,
    load_pretrained_tokenizer,
    mask_tokens,
    stdlib_sentences,
    tokenize_cached,
    tokenizer_fingerprint,
    train_wordpiece,
)
from gputech_bench.data import corpus as corpus_module
from gputech_bench.data import tokenizer as tokenizer_module
from gputech_bench.data.cache import token_cache_file
from gputech_bench.data.sentences import is_prose_sentence, split_sentences
from gputech_bench.data.stdlib_docstrings import stdlib_directory
from gputech_bench.errors import DataError

# How many unique sentences the stdlib gives depends on the Python and on how it was packaged:
# about 11,300-11,800 for python.org's 3.10-3.13, but Debian's 3.11.2 gives 8,539 and Ubuntu's
# 3.12.3 8,055, since distributions move the stdlib's test suite (and idlelib, tkinter...) into
# packages of their own; without those, 3.10-3.13 give 7,600-7,800. Every one of them has
# thousands: enough for the cpu preset's 1,200 + 110 without a repeat. The seed's 10,000 + 110
# may then repeat training sentences (embedded_corpus does so, and says so). Far fewer than
# this would mean the extraction or the filters broke.
MIN_STDLIB_SENTENCES = 5_000
# Small tokenizer settings keep the tokenizer tests well under a second each.
TOKENIZER_SENTENCES = 2_000
TOKENIZER_VOCAB = 1_500


def assert_one_line_data_error(excinfo: pytest.ExceptionInfo[DataError], *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert ":" in message, f"message should name the problem and then the fix: {message}"
    for fragment in fragments:
        assert fragment in message, message


# --- shared, expensive fixtures ------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stdlib-cache")


@pytest.fixture(scope="module")
def sentences(stdlib_cache: Path) -> list[str]:
    """The one cold stdlib parse of this test module (~10 s); everything else reuses its cache."""
    return stdlib_sentences(stdlib_cache)


@pytest.fixture(scope="module")
def small_corpus(sentences: list[str], stdlib_cache: Path) -> Corpus:
    return embedded_corpus(n_train=TOKENIZER_SENTENCES, n_eval=200, seed=0, cache_dir=stdlib_cache)


@pytest.fixture(scope="module")
def tokenizer(small_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory):
    cache_dir = tmp_path_factory.mktemp("tokenizer-cache")
    return train_wordpiece(small_corpus.train, TOKENIZER_VOCAB, cache_dir, small_corpus.fingerprint)


# --- stdlib sentences ------------------------------------------------------------------------


def test_stdlib_sentences_are_plentiful_unique_sorted_prose(sentences: list[str]) -> None:
    assert len(sentences) >= MIN_STDLIB_SENTENCES
    assert sentences == sorted(set(sentences))
    for sentence in sentences:
        assert is_prose_sentence(sentence), sentence
        assert sentence == " ".join(sentence.split()), "whitespace must be normalised"


def test_stdlib_sentences_second_call_is_served_from_cache(
    sentences: list[str], stdlib_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_if_parsed(*_args, **_kwargs):
        raise AssertionError("the stdlib was parsed again although its sentences are cached")

    monkeypatch.setattr(corpus_module, "extract_stdlib_sentences", fail_if_parsed)
    assert stdlib_sentences(stdlib_cache) == sentences


def test_stdlib_extraction_is_deterministic_across_cache_dirs_and_walk_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two cold extractions of the full stdlib would cost ~20 s, so compare two cold
    # extractions of one package instead, the second with a reversed directory walk.
    package_root = stdlib_directory() / "email"
    monkeypatch.setattr(corpus_module, "stdlib_directory", lambda: package_root)
    first = stdlib_sentences(tmp_path / "a")

    real_walk = os.walk

    def reversed_walk(top, *args, **kwargs):
        for directory, subdirectories, files in real_walk(top, *args, **kwargs):
            subdirectories.reverse()
            yield directory, subdirectories, list(reversed(files))

    monkeypatch.setattr(os, "walk", reversed_walk)
    second = stdlib_sentences(tmp_path / "b")
    assert len(first) > 100
    assert first == second


def test_corrupt_sentence_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_root = stdlib_directory() / "json"
    monkeypatch.setattr(corpus_module, "stdlib_directory", lambda: package_root)
    expected = stdlib_sentences(tmp_path)
    (cache_file,) = (tmp_path / "corpus").glob("*.json")
    cache_file.write_text("{not json", encoding="utf-8")
    assert stdlib_sentences(tmp_path) == expected


def test_sentence_filters_keep_prose_and_reject_code() -> None:
    docstring = (
        "Return the number of items in the queue.\n\n"
        "Example:\n"
        "    >>> q.qsize()\n"
        "    3\n\n"
        "Use d = {'a': 1} to build it. The value_name is ignored here. Call obj.method() first."
    )
    kept = [s for s in split_sentences(docstring) if is_prose_sentence(s)]
    assert kept == ["Return the number of items in the queue."]
    assert not is_prose_sentence("too short.")
    assert not is_prose_sentence("lowercase start is not a sentence here.")
    assert not is_prose_sentence("This sentence has no final full stop")


# --- embedded corpus --------------------------------------------------------------------------


def test_embedded_corpus_split_sizes_and_fingerprint(sentences: list[str], stdlib_cache: Path) -> None:
    # The cpu preset's split, which every stdlib holds without a repeat (the seed's may not be).
    corpus = embedded_corpus(n_train=1_200, n_eval=110, seed=0, cache_dir=stdlib_cache)
    assert (len(corpus.train), len(corpus.eval)) == (1_200, 110)
    assert len(set(corpus.train)) == 1_200 and corpus.repeated_train == 0
    assert not set(corpus.train) & set(corpus.eval)
    assert corpus.source.startswith("python-stdlib-docstrings (Python ")
    assert len(corpus.fingerprint) == 16

    same = embedded_corpus(n_train=1_200, n_eval=110, seed=0, cache_dir=stdlib_cache)
    assert same == corpus
    other_seed = embedded_corpus(n_train=1_200, n_eval=110, seed=1, cache_dir=stdlib_cache)
    assert other_seed.fingerprint != corpus.fingerprint
    other_split = embedded_corpus(n_train=1_201, n_eval=109, seed=0, cache_dir=stdlib_cache)
    assert other_split.fingerprint != corpus.fingerprint


def test_embedded_corpus_with_too_few_sentences_repeats_training_ones_and_says_so(
    sentences: list[str], stdlib_cache: Path
) -> None:
    """Python 3.12.3's stdlib gave 8,055 sentences, fewer than the seed's 10,000 + 110: the
    eval split stays unique, and the training split repeats sentences to keep the epoch's length."""
    n_train = len(sentences) + 500
    corpus = embedded_corpus(n_train=n_train, n_eval=110, seed=0, cache_dir=stdlib_cache)
    assert (len(corpus.train), len(corpus.eval)) == (n_train, 110)
    assert len(set(corpus.eval)) == 110 and not set(corpus.train) & set(corpus.eval)
    unique_train = len(sentences) - 110
    assert len(set(corpus.train)) == unique_train
    assert corpus.repeated_train == n_train - unique_train == 610
    assert embedded_corpus(n_train=n_train, n_eval=110, seed=0, cache_dir=stdlib_cache) == corpus
    # Enough sentences: nothing repeats, and the split is the plain one.
    enough = embedded_corpus(n_train=1000, n_eval=110, seed=0, cache_dir=stdlib_cache)
    assert enough.repeated_train == 0 and len(set(enough.train)) == 1000


def test_embedded_corpus_without_training_sentences_names_the_available_count(
    sentences: list[str], stdlib_cache: Path
) -> None:
    with pytest.raises(DataError) as excinfo:
        embedded_corpus(n_train=10, n_eval=len(sentences), seed=0, cache_dir=stdlib_cache)
    assert_one_line_data_error(excinfo, str(len(sentences)), "--train-file")


def test_a_run_on_a_smaller_stdlib_repeats_training_sentences_and_its_table_says_so(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The product's own path, whatever this Python's stdlib holds: a stand-in stdlib of 60
    sentences for the tiny run's 96 + 16 keeps 16 unique eval sentences and repeats 52
    training ones, and the cell's data and every table say so."""
    from gputech_bench.config import apply_overrides
    from gputech_bench.data.prepare import prepare_data
    from gputech_bench.report.frame import build_frame
    from gputech_bench.report.table import table_notes

    few = sorted(f"The sentence number {i} stands in for a stdlib docstring." for i in range(60))
    monkeypatch.setattr(corpus_module, "stdlib_sentences", lambda cache_dir=None: few)
    data = prepare_data(apply_overrides(tiny_config, [f"data.cache_dir={tmp_path}"]))
    assert (len(data.train), len(data.eval_set.input_ids)) == (96, 16)
    assert data.info["train_sentences"] == 96 and data.info["train_sentences_repeated"] == 96 - (60 - 16)
    result = make_result("baseline", tracked_peak_mib=10.0, epoch_seconds=1.0)
    result.data = data.info
    frame, _ = build_frame([result])
    assert any(note.startswith("the training split repeats 52 sentences: python-stdlib-docstrings (Python ")
               for note in table_notes(frame))


def test_every_table_says_when_the_training_split_repeats_sentences() -> None:
    from gputech_bench.report.frame import build_frame
    from gputech_bench.report.table import table_notes

    result = make_result("baseline", tracked_peak_mib=10.0, epoch_seconds=1.0)
    result.data = {"corpus_source": "python-stdlib-docstrings (Python 3.12.3)", "train_sentences_repeated": 2055}
    frame, _ = build_frame([result])
    assert any(note.startswith("the training split repeats 2,055 sentences: python-stdlib-docstrings (Python 3.12.3)")
               for note in table_notes(frame))
    result.data["train_sentences_repeated"] = 0
    frame, _ = build_frame([result])
    assert not any("repeats" in note for note in table_notes(frame))


def test_default_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPUTECH_BENCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("GPUTECH_BENCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "gputech-bench"


# --- corpus files -----------------------------------------------------------------------------


def write_lines(path: Path, count: int) -> Path:
    path.write_text("".join(f"  Sentence number {i} of the file.  \n\n" for i in range(count)), encoding="utf-8")
    return path


def test_load_corpus_files_holds_out_eval_deterministically(tmp_path: Path) -> None:
    train_file = write_lines(tmp_path / "train.txt", 50)
    corpus = load_corpus_files(train_file, None, n_train=None, n_eval=10, seed=3)
    assert (len(corpus.train), len(corpus.eval)) == (40, 10)
    assert not set(corpus.train) & set(corpus.eval)
    assert all(s == s.strip() and s for s in corpus.train + corpus.eval)
    assert load_corpus_files(train_file, None, n_train=None, n_eval=10, seed=3) == corpus
    limited = load_corpus_files(train_file, None, n_train=5, n_eval=10, seed=3)
    assert limited.train == corpus.train[:5] and limited.eval == corpus.eval


def test_load_corpus_files_with_eval_file(tmp_path: Path) -> None:
    train_file = write_lines(tmp_path / "train.txt", 30)
    eval_file = write_lines(tmp_path / "eval.txt", 8)
    corpus = load_corpus_files(train_file, eval_file, n_train=20, n_eval=5, seed=0)
    assert corpus.train == tuple(f"Sentence number {i} of the file." for i in range(20))
    assert corpus.eval == tuple(f"Sentence number {i} of the file." for i in range(5))
    assert corpus.source == "files: train.txt, eval.txt"


@pytest.mark.parametrize(
    ("setup", "expected_fragment"),
    [
        (lambda d: d / "missing.txt", "not found"),
        (lambda d: (d / "empty.txt").write_text("\n   \n", encoding="utf-8") and d / "empty.txt", "no non-blank lines"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "latin1.txt").write_bytes(b"caf\xe9 au lait.\n") and d / "latin1.txt", "not valid UTF-8"),
    ],
    ids=["missing", "empty", "directory", "undecodable"],
)
def test_load_corpus_files_bad_train_file_raises_one_line(tmp_path: Path, setup, expected_fragment: str) -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus_files(setup(tmp_path), None, n_train=None, n_eval=1, seed=0)
    assert_one_line_data_error(excinfo, expected_fragment, "--train-file")


def test_load_corpus_files_missing_eval_file_names_eval_flag(tmp_path: Path) -> None:
    train_file = write_lines(tmp_path / "train.txt", 5)
    with pytest.raises(DataError) as excinfo:
        load_corpus_files(train_file, tmp_path / "nope.txt", n_train=None, n_eval=1, seed=0)
    assert_one_line_data_error(excinfo, "not found", "--eval-file")


def test_load_corpus_files_too_few_lines_to_hold_out(tmp_path: Path) -> None:
    train_file = write_lines(tmp_path / "train.txt", 3)
    with pytest.raises(DataError) as excinfo:
        load_corpus_files(train_file, None, n_train=None, n_eval=3, seed=0)
    assert_one_line_data_error(excinfo, "3 sentences")


# --- tokenizer ----------------------------------------------------------------------------------


def test_wordpiece_training_is_deterministic(small_corpus: Corpus, tmp_path: Path) -> None:
    # Different cache dirs force two real trainings (tokenizers' trainer alone is not deterministic).
    first = train_wordpiece(small_corpus.train, TOKENIZER_VOCAB, tmp_path / "a", small_corpus.fingerprint)
    second = train_wordpiece(small_corpus.train, TOKENIZER_VOCAB, tmp_path / "b", small_corpus.fingerprint)
    assert first.get_vocab() == second.get_vocab()
    assert len(first) == TOKENIZER_VOCAB
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)


def test_wordpiece_special_tokens_and_transformers_call(tokenizer) -> None:
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id] == [0, 1, 2]
    assert [tokenizer.sep_token_id, tokenizer.mask_token_id] == [3, 4]
    encoded = tokenizer(
        ["Return the hash value.", "A much longer sentence " * 20],
        padding="max_length",
        truncation=True,
        max_length=16,
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, 0] == tokenizer.cls_token_id and ids[1, -1] == tokenizer.sep_token_id
    assert ids[0, -1] == tokenizer.pad_token_id and mask[0, -1] == 0
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "return the hash value."


def test_wordpiece_is_loaded_from_cache(small_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = train_wordpiece(small_corpus.train, TOKENIZER_VOCAB, tmp_path, small_corpus.fingerprint)

    def fail_if_trained(*_args, **_kwargs):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(tokenizer_module, "_train_backend", fail_if_trained)
    cached = train_wordpiece(small_corpus.train, TOKENIZER_VOCAB, tmp_path, small_corpus.fingerprint)
    assert cached.get_vocab() == trained.get_vocab()
    assert tokenizer_fingerprint(cached) == tokenizer_fingerprint(trained)


def test_tokenizer_fingerprint_ignores_padding_state(tokenizer) -> None:
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["Some text here."], padding="max_length", truncation=True, max_length=12)
    assert tokenizer_fingerprint(tokenizer) == before


def test_load_pretrained_tokenizer_round_trip_and_errors(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path / "saved")
    loaded = load_pretrained_tokenizer(str(tmp_path / "saved"))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded("Return the value.")["input_ids"] == tokenizer("Return the value.")["input_ids"]

    with pytest.raises(DataError) as excinfo:
        load_pretrained_tokenizer(str(tmp_path / "no" / "such" / "folder"))
    assert_one_line_data_error(excinfo, "not found")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(DataError) as excinfo:
        load_pretrained_tokenizer(str(tmp_path / "empty-folder"))
    assert_one_line_data_error(excinfo, "could not load tokenizer")


# --- masking ---------------------------------------------------------------------------------------

VOCAB = 1_000
SPEC = MaskingSpec(mask_token_id=4, vocab_size=VOCAB, special_token_ids=(0, 1, 2, 3, 4))


def batch_with_specials(rows: int = 400, length: int = 256) -> torch.Tensor:
    """Random ordinary tokens framed like real batches: [CLS] ... [SEP] [PAD]..."""
    ids = torch.randint(5, VOCAB, (rows, length), generator=torch.Generator().manual_seed(123))
    ids[:, 0] = 2
    lengths = torch.randint(length // 2, length, (rows,), generator=torch.Generator().manual_seed(7))
    for row, used in enumerate(lengths.tolist()):
        ids[row, used] = 3
        ids[row, used + 1 :] = 0
    return ids


def test_masking_rates_follow_bert_80_10_10() -> None:
    ids = batch_with_specials()
    original = ids.clone()
    masked, labels = mask_tokens(ids, SPEC, torch.Generator().manual_seed(0))

    assert torch.equal(ids, original), "input must not be modified"
    eligible = ~torch.isin(ids, torch.tensor(SPEC.special_token_ids))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any(), "special tokens must never be chosen"
    assert torch.equal(masked[~eligible], ids[~eligible])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])

    assert abs(chosen.sum().item() / eligible.sum().item() - 0.15) < 0.01
    n_chosen = chosen.sum().item()
    to_mask = (masked == SPEC.mask_token_id) & chosen
    unchanged = (masked == ids) & chosen
    to_random = chosen & ~to_mask & ~unchanged
    assert abs(to_mask.sum().item() / n_chosen - 0.8) < 0.02
    # A random replacement equal to the original (chance 1/VOCAB) counts as unchanged.
    assert abs(to_random.sum().item() / n_chosen - 0.1) < 0.015
    assert abs(unchanged.sum().item() / n_chosen - 0.1) < 0.015
    assert int(masked.min()) >= 0 and int(masked.max()) < VOCAB


def test_masking_is_deterministic_per_seed() -> None:
    ids = batch_with_specials(rows=32, length=64)
    first = mask_tokens(ids, SPEC, torch.Generator().manual_seed(42))
    second = mask_tokens(ids, SPEC, torch.Generator().manual_seed(42))
    other = mask_tokens(ids, SPEC, torch.Generator().manual_seed(43))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_masking_spec_rejects_bad_probability_and_builds_from_tokenizer(tokenizer) -> None:
    with pytest.raises(DataError):
        MaskingSpec(mask_token_id=4, vocab_size=10, special_token_ids=(0,), probability=1.5)
    spec = MaskingSpec.from_tokenizer(tokenizer)
    assert spec.mask_token_id == tokenizer.mask_token_id
    assert spec.vocab_size == len(tokenizer)
    assert spec.special_token_ids == (0, 1, 2, 3, 4)


# --- token cache -----------------------------------------------------------------------------------


class ExplodingTokenizer:
    """Stands in for a tokenizer when the test expects a cache hit."""

    def __call__(self, *_args, **_kwargs):
        raise AssertionError("tokenizer called although the split should come from the cache")


def test_tokenize_cached_returns_identical_tensors_from_cache(tokenizer, small_corpus: Corpus, tmp_path: Path) -> None:
    fingerprint = tokenizer_fingerprint(tokenizer)
    args = (32, tmp_path, small_corpus.fingerprint, fingerprint, "eval")
    built = tokenize_cached(small_corpus.eval, tokenizer, *args)
    assert isinstance(built, TokenizedSplit) and len(built) == len(small_corpus.eval)
    assert built.input_ids.shape == built.attention_mask.shape == (len(small_corpus.eval), 32)
    assert built.input_ids.dtype == built.attention_mask.dtype == torch.long

    cached = tokenize_cached(small_corpus.eval, ExplodingTokenizer(), *args)
    assert torch.equal(cached.input_ids, built.input_ids)
    assert torch.equal(cached.attention_mask, built.attention_mask)


def test_tokenize_cached_rebuilds_corrupt_cache_file(tokenizer, small_corpus: Corpus, tmp_path: Path) -> None:
    fingerprint = tokenizer_fingerprint(tokenizer)
    args = (32, tmp_path, small_corpus.fingerprint, fingerprint, "eval")
    built = tokenize_cached(small_corpus.eval, tokenizer, *args)
    cache_file = token_cache_file(tmp_path, small_corpus.fingerprint, fingerprint, 32, "eval")
    cache_file.write_bytes(b"this is not a torch file")

    rebuilt = tokenize_cached(small_corpus.eval, tokenizer, *args)
    assert torch.equal(rebuilt.input_ids, built.input_ids)
    assert torch.equal(rebuilt.attention_mask, built.attention_mask)
    assert tokenize_cached(small_corpus.eval, ExplodingTokenizer(), *args).input_ids.shape == built.input_ids.shape


def test_tokenize_cached_key_separates_splits_and_lengths(tmp_path: Path) -> None:
    keys = {
        token_cache_file(tmp_path, "corpus", "tok", 32, "train"),
        token_cache_file(tmp_path, "corpus", "tok", 32, "eval"),
        token_cache_file(tmp_path, "corpus", "tok", 64, "train"),
        token_cache_file(tmp_path, "corpus", "tok2", 32, "train"),
        token_cache_file(tmp_path, "corpus2", "tok", 32, "train"),
    }
    assert len(keys) == 5


def test_unwritable_cache_dir_raises_one_line(tokenizer, small_corpus: Corpus, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file-in-the-way"
    not_a_folder.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        tokenize_cached(small_corpus.eval, tokenizer, 32, not_a_folder, small_corpus.fingerprint, "fp", "eval")
    assert_one_line_data_error(excinfo, "cannot write cache file", "GPUTECH_BENCH_CACHE")
