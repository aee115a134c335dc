"""Cache writes for the data layer: atomic, and an unwritable cache folder is a DataError."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_bytes
from .errors import DataError


def write_cache_file(path: Path, data: bytes) -> None:
    """atomic_write_bytes for cache entries: an unwritable cache folder is a user-fixable DataError."""
    try:
        atomic_write_bytes(path, data)
    except OSError as error:
        raise DataError(
            f"cannot write cache file '{path}' ({error.strerror or error}): "
            f"use a writable cache folder, e.g. set GPUTECH_BENCH_CACHE"
        ) from None
