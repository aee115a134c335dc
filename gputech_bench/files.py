"""File work every layer shares: atomic writes, create-if-absent writes, cache writes and content fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DataError

# mkstemp creates files readable by their owner only; results, reports and plots are for
# sharing, so they get the permissions an ordinary file would. Read once, at import, while
# the process has one thread: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)

# 16 hex chars = 64 bits: collisions are irrelevant at the scale of a cache folder,
# and short keys keep file names and reports readable.
FINGERPRINT_CHARS = 16


def _complete_temp_file(path: Path, data: bytes) -> str:
    """``data`` written and synced to a temp file beside ``path``; returns its name.

    Beside, because os.replace and os.link are only atomic within one filesystem."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return tmp_name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one.

    Concurrent writers of the same cache entry are harmless because each replaces the file
    with identical, complete content.
    """
    tmp_name = _complete_temp_file(path, data)
    try:
        os.replace(tmp_name, path)
    except BaseException:
        # Never leave stray temp files behind, even on KeyboardInterrupt.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def create_exclusive_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if no file is there: True when this call made it,
    False when another process (another machine, on a shared filesystem) got there first.

    The complete file is written beside ``path`` and hard-linked to it: a link fails when the
    name exists, atomically even on NFS, so a reader never sees a half-written file and two
    writers never both win. A filesystem without hard links falls back to ``O_EXCL``.
    """
    tmp_name = _complete_temp_file(path, data)
    try:
        try:
            os.link(tmp_name, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and object-store mounts)
            try:
                exclusive = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(exclusive, "wb") as out:
                out.write(data)
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _json_bytes(value: Any) -> bytes:
    """``value`` as indented JSON; NaN and infinity become null."""
    return (json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n").encode("utf-8")


def create_exclusive_json(path: Path, value: Any) -> bool:
    """``value`` as indented JSON at ``path`` unless a file is there (``create_exclusive_bytes``)."""
    return create_exclusive_bytes(Path(path), _json_bytes(value))


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON; store them as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> Path:
    """``value`` as indented JSON, atomically; NaN and infinity become null."""
    atomic_write_bytes(Path(path), _json_bytes(value))
    return Path(path)


def write_cache_file(path: Path, data: bytes) -> None:
    """atomic_write_bytes for cache entries: an unwritable cache folder is a user-fixable DataError."""
    try:
        atomic_write_bytes(path, data)
    except OSError as error:
        raise DataError(
            f"cannot write cache file '{path}' ({error.strerror or error}): "
            f"use a writable cache folder, e.g. set GPUTECH_BENCH_CACHE"
        ) from None


def short_sha256(text: str) -> str:
    """First FINGERPRINT_CHARS hex digits of the SHA-256 of `text` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def fingerprint_of(value: Any) -> str:
    """Hash of a JSON-serialisable value; canonical JSON makes it independent of dict order."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return short_sha256(canonical)
