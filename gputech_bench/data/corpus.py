"""The sentences the benchmark trains and evaluates on, and where they come from."""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..files import fingerprint_of, write_cache_file
from .sentences import prose_sentences
from .stdlib_docstrings import stdlib_directory, stdlib_docstrings

CACHE_DIR_ENV_VAR = "GPUTECH_BENCH_CACHE"
# Bump when the extraction or filters change, so stale sentence caches are ignored.
STDLIB_EXTRACTOR_VERSION = 1


@dataclass(frozen=True)
class Corpus:
    """Train and eval sentences plus enough provenance to reproduce and cache them.

    `fingerprint` identifies the exact text of both splits; every downstream cache
    (tokenizer, token tensors) is keyed by it.
    """

    train: tuple[str, ...]
    eval: tuple[str, ...]
    source: str
    fingerprint: str
    #: Training sentences that repeat an earlier one, because the embedded corpus has fewer
    #: unique sentences than were asked for (never done with a user's files).
    repeated_train: int = 0


def corpus_fingerprint(train_split: Sequence[str], eval_split: Sequence[str]) -> str:
    """Hash of the exact split contents; JSON keeps "a|b" + "c" distinct from "a" + "b|c"."""
    return fingerprint_of({"train": list(train_split), "eval": list(eval_split)})


def default_cache_dir() -> Path:
    """$GPUTECH_BENCH_CACHE if set, else ~/.cache/gputech-bench."""
    configured = os.environ.get(CACHE_DIR_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "gputech-bench"


# --- the embedded corpus: sentences from the Python stdlib's own docstrings -------------


def stdlib_corpus_source() -> str:
    """Human-readable source label; the Python version matters because stdlib text changes."""
    return f"python-stdlib-docstrings (Python {platform.python_version()})"


def _stdlib_cache_file(cache_dir: Path, stdlib_root: Path) -> Path:
    # Different interpreters (versions, or installs with patched stdlibs) get different files.
    key = fingerprint_of([STDLIB_EXTRACTOR_VERSION, platform.python_version(), str(stdlib_root)])
    return cache_dir / "corpus" / f"stdlib-sentences-py{platform.python_version()}-{key}.json"


def _read_sentence_cache(path: Path) -> list[str] | None:
    """The cached sentence list, or None if missing or unreadable (then it is rebuilt)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        sentences = payload["sentences"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        return None
    return sentences


def extract_stdlib_sentences(stdlib_root: Path) -> list[str]:
    """Parse the stdlib at `stdlib_root` and return its unique prose sentences, sorted."""
    unique = {s for docstring in stdlib_docstrings(stdlib_root) for s in prose_sentences(docstring)}
    return sorted(unique)


def stdlib_sentences(cache_dir: Path | None = None) -> list[str]:
    """Unique English prose sentences from the stdlib's docstrings, sorted.

    The first call parses ~1,800 source files (about 10 s); the result is cached as
    JSON in `cache_dir` (default: default_cache_dir()) so later calls take milliseconds.
    """
    root = stdlib_directory()
    cache_file = _stdlib_cache_file(cache_dir or default_cache_dir(), root)
    cached = _read_sentence_cache(cache_file)
    if cached is not None:
        return cached
    started = time.perf_counter()
    sentences = extract_stdlib_sentences(root)
    payload = {
        "extractor_version": STDLIB_EXTRACTOR_VERSION,
        "python_version": platform.python_version(),
        "stdlib": str(root),
        "extraction_seconds": round(time.perf_counter() - started, 2),
        "count": len(sentences),
        "sentences": sentences,
    }
    write_cache_file(cache_file, json.dumps(payload, ensure_ascii=False, indent=0).encode("utf-8"))
    return sentences


def _require_positive(split_name: str, count: int) -> None:
    if count < 1:
        raise DataError(
            f"the number of {split_name} sentences must be at least 1 (got {count}): ask for a positive number"
        )


def embedded_corpus(n_train: int, n_eval: int, seed: int, cache_dir: Path) -> Corpus:
    """A seeded random split of the stdlib sentences: eval first, then train, no overlap.

    How many unique sentences the stdlib holds depends on the Python (3.11's gave about
    11,000, 3.12.3's 8,055), and the seed preset asks for 10,000 + 110. When there are
    too few, the eval split stays unique and the training split repeats sentences, in the
    shuffled order, up to the size asked for: an epoch then has the seed's number of steps,
    which is what memory and time per epoch are about. ``repeated_train`` says how many,
    and every table says so."""
    _require_positive("train", n_train)
    _require_positive("eval", n_eval)
    sentences = stdlib_sentences(cache_dir)
    if n_eval >= len(sentences):
        raise DataError(
            f"asked for {n_eval} eval sentences but the Python {platform.python_version()} stdlib docstrings "
            f"gave only {len(sentences)}, which leaves none to train on: lower data.eval_sentences or pass your "
            "own corpus with --train-file"
        )
    shuffled = list(sentences)
    random.Random(seed).shuffle(shuffled)
    eval_split = tuple(shuffled[:n_eval])
    pool = shuffled[n_eval:]
    train_split = tuple(pool[index % len(pool)] for index in range(n_train))
    return Corpus(
        train=train_split,
        eval=eval_split,
        source=stdlib_corpus_source(),
        fingerprint=corpus_fingerprint(train_split, eval_split),
        repeated_train=max(0, n_train - len(pool)),
    )


# --- user-supplied corpora: plain text files, one sentence per line --------------------


def read_sentence_file(path: Path, role: str, flag: str) -> list[str]:
    """Non-blank, stripped lines of a UTF-8 text file, or a one-line DataError saying why not.

    `role` ("train"/"eval") and `flag` ("--train-file") only shape the error message.
    """
    fix = f"pass an existing UTF-8 text file with one sentence per line to {flag}"
    if not path.exists():
        raise DataError(f"{role} file '{path}' not found: {fix}")
    if path.is_dir():
        raise DataError(f"{role} file '{path}' is a directory: {fix}")
    try:
        # utf-8-sig silently drops a byte-order mark that Windows editors like to add.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{role} file '{path}' is not valid UTF-8 (bad byte at offset {error.start}): "
            f"re-save it as UTF-8 and pass it to {flag}"
        ) from None
    except OSError as error:
        raise DataError(f"{role} file '{path}' could not be read ({error.strerror or error}): {fix}") from None
    lines = [line.strip() for line in text.splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise DataError(f"{role} file '{path}' has no non-blank lines: {fix}")
    return sentences


def load_corpus_files(
    train_file: Path,
    eval_file: Path | None,
    n_train: int | None,
    n_eval: int,
    seed: int,
) -> Corpus:
    """A Corpus from text files with one sentence per line (blank lines ignored).

    With `eval_file`, eval is its first `n_eval` lines (all of them if it has fewer)
    and train is the first `n_train` lines of `train_file` (all if None); `seed` is
    unused. Without it, the train file is shuffled with `seed`, the first `n_eval`
    lines become eval and the next `n_train` (or all the rest) become train.
    """
    train_file, eval_file = Path(train_file), (None if eval_file is None else Path(eval_file))
    _require_positive("eval", n_eval)
    if n_train is not None:
        _require_positive("train", n_train)
    train_lines = read_sentence_file(train_file, "train", "--train-file")

    if eval_file is not None:
        eval_lines = read_sentence_file(eval_file, "eval", "--eval-file")[:n_eval]
        source = f"files: {train_file.name}, {eval_file.name}"
        available_train = train_lines
    else:
        if len(train_lines) <= n_eval:
            raise DataError(
                f"train file '{train_file}' has {len(train_lines)} sentences, too few to hold out "
                f"{n_eval} for eval and keep any for training: add lines, lower the eval size, or pass --eval-file"
            )
        shuffled = list(train_lines)
        random.Random(seed).shuffle(shuffled)
        eval_lines, available_train = shuffled[:n_eval], shuffled[n_eval:]
        source = f"files: {train_file.name} ({n_eval} lines held out for eval)"

    if n_train is not None and n_train > len(available_train):
        raise DataError(
            f"asked for {n_train} train sentences but '{train_file}' provides only {len(available_train)}: "
            f"lower the train size or add lines to the file"
        )
    train_split = tuple(available_train if n_train is None else available_train[:n_train])
    eval_split = tuple(eval_lines)
    return Corpus(
        train=train_split,
        eval=eval_split,
        source=source,
        fingerprint=corpus_fingerprint(train_split, eval_split),
    )
