"""Which training steps a cell's CUDA memory peaks cover."""

from __future__ import annotations

import torch

from . import cuda as cuda_memory


class PeakWindow:
    """Which training steps the CUDA peaks cover.

    Normally all of them. A compiled cell is different: its memory-tracked step runs
    under MemTracker, whose dispatch hooks make the compiled module run op by op, so
    that step's peaks are the eager model's. There the peaks restart after the tracked
    step, and cover the compiled steps only.
    """

    def __init__(self, device: torch.device, sampler: cuda_memory.NvmlSampler | None, compiled: bool) -> None:
        self.device, self.sampler, self.compiled = device, sampler, compiled
        self.description = "over the training steps"
        self.notes: list[str] = []
        if compiled:
            self.notes.append(
                "compile: the memory breakdown comes from the memory-tracked step, which runs eagerly under "
                "MemTracker (its dispatch hooks run the compiled module op by op)"
                + ("; the CUDA peaks come from the compiled steps after it" if device.type == "cuda"
                   else "; on CPU that eager step's peak is also the tensor peak shown")
            )

    def after_tracked_step(self, more_steps: bool) -> None:
        if not (self.compiled and self.device.type == "cuda"):
            return
        if not more_steps:
            self.notes.append("compile: no step ran after the memory-tracked one, so the CUDA peaks are that eager "
                              "step's: raise train.max_steps to 3 or more")
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # hand back what the eager step reserved, so reserved and NVML restart too
        cuda_memory.reset_peaks(self.device)
        if self.sampler is not None:
            self.sampler.restart()
        self.description = "over the compiled training steps after the memory-tracked (eager) one"
