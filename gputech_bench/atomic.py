"""Atomic file writes: readers see the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# mkstemp creates files readable by their owner only; results, reports and plots are for
# sharing, so they get the permissions an ordinary file would. Read once, at import, while
# the process has one thread: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one.

    The temp file lives in the destination folder because os.replace is only atomic
    within one filesystem; concurrent writers of the same cache entry are harmless
    because each replaces the file with identical, complete content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Never leave stray temp files behind, even on KeyboardInterrupt.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
