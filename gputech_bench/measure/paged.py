"""Optimizer state that bitsandbytes pages through CUDA unified memory.

bitsandbytes' paged optimizers (``PagedAdamW8bit``) allocate their state with
``cudaMallocManaged`` and wrap it as a tensor flagged ``is_paged``. That memory is
outside torch's caching allocator, so ``max_memory_allocated`` and
``max_memory_reserved`` never see it, and torch's MemTracker files it as host memory
(the tensor wraps a host pointer). Without this figure, paged-adam8bit would look
smaller than strategy 3 by exactly its optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch


def paged_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors that live in unified memory."""
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if torch.is_tensor(value) and getattr(value, "is_paged", False):
                total += value.numel() * value.element_size()
    return total
