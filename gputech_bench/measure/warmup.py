"""Load the GPU libraries a cell will use before its CUDA context is measured.

``--gpu-memory-limit`` counts the CUDA context against the emulated card. The
context is not only what ``torch.zeros(1)`` creates: cuBLAS and cuBLASLt load their
kernels and handles at the first matrix product, autocast's half-precision kernels
at the first half-precision one, and bitsandbytes its own library at its first
kernel. A plain reference loop saw about 740 MiB outside the allocator during
training, far more than right after ``torch.zeros(1)``. So a tiny forward and
backward of the cell's own kind runs first, in every dtype the cell may use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The library name a strategy's ``libraries`` fact gives for bitsandbytes (its CUDA library
#: loads at its first kernel).
BITSANDBYTES = "bitsandbytes"
#: torchao's low-bit optimizers compile their update with Triton on CUDA: its first kernel
#: loads Triton's runtime and a CUDA module.
TORCHAO = "torchao"


def _tiny_training_step(device: torch.device, dtype: torch.dtype | None) -> None:
    """Linear, GELU, layer norm, softmax attention scores and cross-entropy, forward and
    backward: the kernel families a transformer step loads, at a size that allocates nothing
    worth counting."""
    weight = torch.randn(64, 64, device=device, requires_grad=True)
    hidden = torch.randn(2, 8, 64, device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        projected = F.gelu(hidden @ weight)
        normed = F.layer_norm(projected, (64,))
        scores = torch.softmax(normed @ normed.transpose(1, 2), dim=-1)
        logits = (scores @ normed).reshape(-1, 64)
        loss = F.cross_entropy(logits.float(), torch.zeros(logits.shape[0], dtype=torch.long, device=device))
    loss.backward()


def _bitsandbytes_step(device: torch.device) -> None:
    import bitsandbytes as bnb

    parameter = torch.nn.Parameter(torch.randn(4096, device=device))
    optimizer = bnb.optim.Adam8bit([parameter])
    parameter.grad = torch.randn_like(parameter)
    optimizer.step()


def _torchao_step(device: torch.device) -> None:
    import torchao.optim

    parameter = torch.nn.Parameter(torch.randn(4096, device=device))
    optimizer = torchao.optim.AdamW4bit([parameter])
    parameter.grad = torch.randn_like(parameter)
    optimizer.step()


def warm_up_cuda_libraries(device: torch.device, libraries: set[str]) -> list[str]:
    """Run what loads the cell's GPU libraries, then hand the allocator's cache back, so
    that what stays outside the allocator is the context a training step really has.
    ``libraries`` are those the cell's strategies declare they need. Returns what was
    warmed up, for the result."""
    warmed = ["cuBLAS/cuBLASLt fp32"]
    _tiny_training_step(device, None)
    for dtype in (torch.float16, torch.bfloat16):
        if device.type != "cuda" or dtype != torch.bfloat16 or torch.cuda.is_bf16_supported():
            _tiny_training_step(device, dtype)
            warmed.append(f"autocast {str(dtype).removeprefix('torch.')}")
    if BITSANDBYTES in libraries:
        _bitsandbytes_step(device)
        warmed.append("bitsandbytes 8-bit optimizer")
    if TORCHAO in libraries:
        _torchao_step(device)
        warmed.append("torchao low-bit optimizer (compiled)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return warmed
