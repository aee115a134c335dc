"""Host-side process memory."""

from __future__ import annotations

import resource
import sys

from ..units import KIB


def peak_rss_bytes() -> int:
    """The process's lifetime peak resident set size (includes Python and imported libraries)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * KIB)
