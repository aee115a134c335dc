"""Where a figure came from: versions, device, command line and time."""

from __future__ import annotations

import os
import platform
import socket
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

#: Set in a cell forked from the runner's fork server (run/forkserver.py), so the result says how
#: its process started.
FORKED_ENV = "GPUTECH_BENCH_FORKED_FROM"


PACKAGES = ("gputech-bench", "torch", "transformers", "tokenizers", "peft", "bitsandbytes", "pandas", "nvidia-ml-py")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def process_origin() -> str:
    """How this process started. Cheap (no torch), so that a cell stopped while torch is still
    importing says it too."""
    return "forked from the runner's preloaded fork server" if os.environ.get(FORKED_ENV) else "fresh interpreter"


def environment() -> dict[str, Any]:
    import torch

    return {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "command": sys.argv,
        # How the process started: its start-up is no figure, but a reader may ask.
        "process": process_origin(),
    }
