"""CUDA allocator history, written as a snapshot that opens in PyTorch's memory_viz.

Open a snapshot by dragging the .pickle file onto https://pytorch.org/memory_viz
(everything stays in the browser), or render it offline with
``python -m torch.cuda._memory_viz trace_plot SNAPSHOT.pickle -o trace.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Allocation events kept: enough for several BERT-base steps, bounded in host memory.
MAX_ENTRIES = 200_000
#: Recording keeps a Python and C++ stack per allocation, which slows every step.
SNAPSHOT_SLOWS_STEPS = (
    "recorded a CUDA memory snapshot (--memory-snapshot): a stack was kept per allocation, so this cell's "
    "times are slower than an unrecorded run's; compare its times only with runs that also recorded one"
)


class MemorySnapshot:
    def __init__(self, cuda: Any | None = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda
        self._cuda = cuda
        self.recording = False

    def start(self) -> None:
        self._cuda.memory._record_memory_history(max_entries=MAX_ENTRIES)
        self.recording = True

    def dump(self, path: Path) -> Path:
        """Write what was recorded and stop recording."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cuda.memory._dump_snapshot(str(path))
        self._cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        return path
