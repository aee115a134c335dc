"""Move a module to a device (and dtype) by replacing its tensors, not swapping them.

``nn.Module.to`` swaps tensors in place when a parameter is a FakeTensor, and
``torch.utils.swap_tensors`` refuses tensors a FakeTensorMode holds weak references
to. Replacing each parameter works for real and fake tensors alike, so the memory
estimate can run the placements' own code. On real tensors it moves the same bytes
as ``.to``: each source tensor is dropped as soon as its copy exists.
"""

from __future__ import annotations

import torch
from torch import nn


def move_module(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """``model.to(device, dtype)``: only floating-point tensors change dtype, and tied
    parameters stay tied (one copy, shared as before)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in moved:
                target = dtype if dtype is not None and param.is_floating_point() else param.dtype
                if param.device == device and param.dtype == target:
                    moved[id(param)] = param
                else:
                    moved[id(param)] = nn.Parameter(
                        param.detach().to(device=device, dtype=target), requires_grad=param.requires_grad
                    )
            module._parameters[name] = moved[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            target = dtype if dtype is not None and buffer.is_floating_point() else buffer.dtype
            module._buffers[name] = buffer.to(device=device, dtype=target)
    return model
