"""amp and amp-fp16: ``torch.autocast`` mixed precision, the modern form of strategy 4.

The weights, gradients and optimizer stay fp32 on the device; matmuls run in half
precision and the activations they save for backward are half-sized. Nothing crosses
to the host, unlike the seed's strategy 4.

``amp`` picks bf16 where the device has it (its fp32-sized exponent needs no loss
scaling) and otherwise fp16 with ``torch.amp.GradScaler``. ``amp-fp16`` always takes
fp16 with the scaler: the choice for GPUs without bf16 (V100, T4), and to compare.
"""

from __future__ import annotations

import contextlib

import torch

from .base import Precision, RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register


class AutocastPrecision(Precision):
    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device_type = device.type
        self.dtype = dtype
        # fp16's 5-bit exponent underflows small gradients: scale the loss up, and skip
        # the steps whose scaled gradients overflow. bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # skipped when the gradients hold inf or NaN
            self.scaler.update()
        else:
            optimizer.step()


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"  # CPU autocast computes bf16 on every x86 and ARM build


class _Autocast(Strategy):
    order = 55
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    # autocast changes the compute's dtype, not only how many activations are live: its own regime in fit.
    time_factor = TimeFactor(0.6, "assumed from commonly reported BERT-base speed-ups on tensor cores (1.5-2x), not "
                             "measured here: a --from run replaces it")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    # Traced on fake CUDA tensors; on a torch without CUDA, whose stand-in device autocast has
    # no rules for, the estimate applies CUDA autocast's op lists itself and labels the figure
    # "stand-in" (estimator/autocast.py).
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = "torch.autocast on the compute device (CUDA, or bf16 on CPU)"
    gives_up = "half-precision rounding in matmuls (weights, gradients and optimizer stay fp32)"
    costs = "none on tensor-core GPUs (usually faster); the fp32 weights stay on the device, so only activations shrink"

    def dtype(self, ctx: RunContext) -> torch.dtype:
        raise NotImplementedError

    def precision(self, ctx: RunContext) -> Precision:
        return AutocastPrecision(ctx.device, self.dtype(ctx))

    def describe(self, model, ctx: RunContext) -> dict:
        dtype = self.dtype(ctx)
        return {
            "autocast_dtype": str(dtype).removeprefix("torch."),
            "loss_scaling": "torch.amp.GradScaler (dynamic)" if dtype == torch.float16 else "none (bf16 needs none)",
            "master_dtype": "float32",
        }


@register
class Amp(_Autocast):
    key = "amp"
    name = "amp"
    saves = "activations: matmul outputs saved in bf16 (fp16 where bf16 is missing), about half their bytes"

    def dtype(self, ctx: RunContext) -> torch.dtype:
        return torch.bfloat16 if supports_bf16(ctx.device) else torch.float16


@register
class AmpFp16(_Autocast):
    key = "amp-fp16"
    name = "amp-fp16"
    order = 56
    saves = "activations: matmul outputs saved in fp16, about half their bytes; GradScaler guards small gradients"
    gives_up = "fp16 rounding in matmuls, with dynamic loss scaling (steps whose gradients overflow are skipped)"

    def dtype(self, ctx: RunContext) -> torch.dtype:
        return torch.float16
