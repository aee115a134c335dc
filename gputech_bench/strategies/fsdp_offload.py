"""fsdp-offload: PyTorch FSDP2 with CPU offload (ZeRO-Offload style).

Parameters, gradients and optimizer state live on the host as DTensor shards; each
transformer layer (the model's own repeated block: BertLayer, LlamaDecoderLayer...), then
the root (embeddings and the LM head, which may share the tied word embedding), is
gathered onto the compute device only while it runs. With world size N (a torchrun
launch) every rank keeps 1/N of each on its host; a lone process keeps all of it, in a
process group of one.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import StrategyError
from .architecture import repeated_blocks
from .base import Placement, RunContext, Strategy
from .facts import StateLocation, TimeFactor, modelled_by
from .distributed import ensure_process_group
from .registry import register

#: Layers are freed after their forward and gathered again for backward; the root is
#: kept, because backward starts with the LM head it holds.
LAYER_RESHARD, ROOT_RESHARD = True, False


class FsdpOffloadPlacement(Placement):
    """The model sharded in place: its parameters become host DTensors that the optimizer steps."""

    # clip_grad_norm_ works on the sharded grads: their norm is a DTensor whose all-reduce
    # spans every rank, so each clips by the global norm (gloo carries it, also on CUDA).
    clips_gradients = True
    shards = True

    def __init__(self, model: nn.Module, ctx: RunContext) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        # FSDP warns once that the root returned a view (the logits); nothing here changes
        # them in place, which is the case the warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.ranks = ensure_process_group(ctx.device)
        mesh = init_device_mesh(ctx.device.type, (self.ranks.world_size,))
        # Pinned host memory lets the copies to and from a GPU overlap compute; on a CPU
        # run there is no copy to speed up, and pinning needs an accelerator.
        policy = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
        # Bottom-up, as FSDP requires: each layer becomes its own unit, the root takes the rest.
        # Found before sharding: fully_shard renames each unit's class (BertLayer -> FSDPBertLayer).
        layers, self.layer_unit = repeated_blocks(model)
        for layer in layers:
            fully_shard(layer, mesh=mesh, offload_policy=policy, reshard_after_forward=LAYER_RESHARD)
        fully_shard(model, mesh=mesh, offload_policy=policy, reshard_after_forward=ROOT_RESHARD)
        self.compute_model = model
        self.compute_dtype = next(model.parameters()).dtype

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.compute_model.parameters() if p.requires_grad]


@register
class FsdpOffload(Strategy):
    key = "fsdp-offload"
    name = "fsdp-offload"
    saves = "device memory: weights, grads and optimizer state stay on the host; only the running layer is on the device"
    costs = "a host->device copy of every layer in forward and again in backward, grads back to the host, a CPU optimizer step"
    order = 45
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(3.8, "assumed equal to strategy 4's, not measured: both move every weight and gradient "
                             "over PCIe each step and step the optimizer on the CPU")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.HOST
    libraries = ()
    micro_batch_counts = ()
    estimate = modelled_by("fsdp-units", traced_in_its_place=None)
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = "torch >= 2.6 with torch.distributed (FSDP2 fully_shard); gloo on CPU, nccl and gloo on CUDA"
    incompatible = {
        key: "bitsandbytes' 8-bit update cannot step FSDP's DTensor parameters"
        for key in ("3", "paged-adam8bit")
    }

    untraceable = "a fake-tensor trace runs no collective and has no process group to shard over"

    def device_refusal(self, ctx: RunContext) -> None:
        if not torch.distributed.is_available():
            raise StrategyError("this torch build has no torch.distributed: install a build with it, or leave fsdp-offload out")
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: F401
        except ImportError:
            raise StrategyError(
                f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard): "
                "install torch >= 2.6, or leave fsdp-offload out"
            ) from None
        needed = {"gloo": torch.distributed.is_gloo_available()}
        if ctx.device.type == "cuda":
            needed["nccl"] = torch.distributed.is_nccl_available()
        missing = [name for name, available in needed.items() if not available]
        if missing:
            raise StrategyError(
                f"this torch build lacks the {' and '.join(missing)} backend that fsdp-offload needs on "
                f"{ctx.device.type}: install a build with it, or leave fsdp-offload out"
            )

    def placement(self, model: nn.Module, ctx: RunContext) -> Placement:
        placement = FsdpOffloadPlacement(model, ctx)
        self.layer_unit = placement.layer_unit
        return placement

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        from torch.distributed.fsdp import FSDPModule

        world_size = torch.distributed.get_world_size()
        units = sum(isinstance(module, FSDPModule) for module in model.modules())
        return {
            "fsdp_world_size": world_size,
            "fsdp_sharding": f"every parameter split on dim 0 across {world_size} rank(s); {units} units "
                             f"({units - 1} transformer layers and the root)",
            "cpu_offload": "parameters, gradients and optimizer state on the host; one unit at a time on the device",
            "fsdp_layer_unit": getattr(self, "layer_unit", "?"),
            "reshard_after_forward": f"layers: {LAYER_RESHARD}; root (embeddings, LM head): {ROOT_RESHARD}",
            "optimizer_device": "cpu",
        }

