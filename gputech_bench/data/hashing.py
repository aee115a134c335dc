"""Short, stable content hashes used for fingerprints and cache keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# 16 hex chars = 64 bits: collisions are irrelevant at the scale of a cache folder,
# and short keys keep file names and reports readable.
FINGERPRINT_CHARS = 16


def short_sha256(text: str) -> str:
    """First FINGERPRINT_CHARS hex digits of the SHA-256 of `text` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def fingerprint_of(value: Any) -> str:
    """Hash of a JSON-serialisable value; canonical JSON makes it independent of dict order."""
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return short_sha256(canonical)
