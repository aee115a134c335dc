"""Strategy 4: the seed's mixed precision - a half-precision compute copy on the device,
an fp32 master copy and the optimizer on the host.

Each step copies the compute grads into the fp32 master, steps the optimizer there
and copies the weights back, as the seed's notebook did (it used load_state_dict;
copying only the trained tensors moves the same bytes for a full fine-tune). There
is no loss scaling and no gradient clipping, as in the seed.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Placement, RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register

HOST = torch.device("cpu")


def compute_dtype_for(ctx: RunContext) -> torch.dtype:
    choice = ctx.config.strategy.half_dtype
    if choice == "auto":
        # fp16 matmul on these CPUs is ~40x slower than fp32; bf16 is the CPU's half type.
        # "meta" is the memory estimate's stand-in for a GPU.
        return torch.float16 if ctx.device.type in ("cuda", "meta") else torch.bfloat16
    return getattr(torch, choice)


def fp32_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every fp32 buffer, to restore after the model turns half."""
    return [
        (module, name, buffer)
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and buffer.dtype == torch.float32
    ]


class MasterCopyPlacement(Placement):
    clips_gradients = False

    def __init__(self, model: nn.Module, ctx: RunContext) -> None:
        self.compute_dtype = compute_dtype_for(ctx)
        # clone(): on a CPU run .to() would otherwise return the very same tensor.
        self.master = nn.ParameterList(
            nn.Parameter(p.detach().to(HOST, torch.float32).clone()) for p in model.parameters() if p.requires_grad
        )
        # Floating-point buffers are constants, not weights: Llama's rotary inverse frequencies
        # (a few hundred bytes) lose position precision in half, and transformers keeps them
        # fp32 in a half model too. BERT, RoBERTa and DistilBERT have integer buffers only.
        float_buffers = fp32_buffers(model)
        # Converting in place frees each fp32 tensor as its half copy appears, so the
        # device never holds both precisions; tied weights stay tied.
        self.compute_model = model.to(device=ctx.device, dtype=self.compute_dtype)
        for module, name, buffer in float_buffers:
            module._buffers[name] = buffer.to(ctx.device)
        # Read after the move (a fake trace replaces parameters rather than converting
        # them); the same order as the master list, since both walk model.parameters().
        self._compute_params = [p for p in self.compute_model.parameters() if p.requires_grad]

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return list(self.master)

    def before_step(self) -> None:
        for master, compute in zip(self.master, self._compute_params):
            master.grad = None if compute.grad is None else compute.grad.detach().to(HOST, torch.float32)
        # The seed zeroes the device grads before the host step, freeing them early.
        self.compute_model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def after_step(self) -> None:
        for master, compute in zip(self.master, self._compute_params):
            compute.copy_(master, non_blocking=False)
            master.grad = None

    def tracked_objects(self) -> list:
        return [self.master]


@register
class MixedPrecision(Strategy):
    key = "4"
    name = "mixed-precision"
    saves = "device memory: half-precision weights, grads and activations; the fp32 master and optimizer state move to the host"
    costs = "a host<->device copy of every weight and grad each step, and an optimizer step on the CPU (the seed measured ~4x the time)"
    order = 40
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(3.8, "measured: the seed's ratio on an A30 (host Adam and PCIe copies)")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.HOST
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    gives_up = "fp16 compute without loss scaling or gradient clipping (as in the seed)"
    # The seed's precision is the default one: the weights themselves are half, with no
    # autocast and no loss scaling. Combined with amp it would be neither recipe.
    incompatible = {
        key: "autocast over weights that are already half precision, and a GradScaler stepping "
             "the host optimizer's fp32 master, would be neither the seed's recipe nor amp's"
        for key in ("amp", "amp-fp16")
    }

    def placement(self, model: nn.Module, ctx: RunContext) -> Placement:
        return MasterCopyPlacement(model, ctx)

    def describe(self, model, ctx: RunContext) -> dict:
        return {
            "compute_dtype": str(compute_dtype_for(ctx)).removeprefix("torch."),
            "master_dtype": "float32",
            "master_device": "cpu",
            "optimizer_device": "cpu",
            "loss_scaling": "none (as in the seed)",
            "gradient_clipping": "none (as in the seed)",
        }
