"""What the two FSDP2 strategies share: the units, the mesh, the checks and the facts.

``fsdp`` and ``fsdp-offload`` shard the model the same way: each of the model's own repeated
blocks (BertLayer, LlamaDecoderLayer...) becomes an FSDP unit, then the root takes the rest
(embeddings and the LM head, which may share the tied word embedding). They differ only in
where the shards live: on the compute device (``fsdp``), or on the host with FSDP's CPU
offload policy (``fsdp-offload``).

With world size N (a torchrun launch) every rank keeps 1/N of each parameter, gradient and
optimizer state; a lone process keeps all of it, in a process group of one. A memory
estimate traces one rank inside a fake process group of N (``distributed.fake_process_group``).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import StrategyError
from .architecture import repeated_blocks
from .base import Placement, RunContext, Strategy
from .distributed import ensure_process_group

#: Layers are freed after their forward and gathered again for backward; the root is
#: kept, because backward starts with the LM head it holds.
LAYER_RESHARD, ROOT_RESHARD = True, False


def fsdp_device_refusal(key: str, ctx: RunContext, offload: bool) -> None:
    """Why this torch cannot run ``key`` (FSDP2 and the backends it needs), as a StrategyError."""
    if not torch.distributed.is_available():
        raise StrategyError(f"this torch build has no torch.distributed: install a build with it, or leave {key} out")
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: F401
    except ImportError:
        raise StrategyError(
            f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard): "
            f"install torch >= 2.6, or leave {key} out"
        ) from None
    if ctx.tracing:
        return  # a trace joins a fake process group: no backend is needed
    needed = {"gloo": torch.distributed.is_gloo_available()}
    if ctx.device.type == "cuda":
        needed["nccl"] = torch.distributed.is_nccl_available()
    missing = [name for name, available in needed.items() if not available]
    if missing:
        raise StrategyError(
            f"this torch build lacks the {' and '.join(missing)} backend that {key} needs on "
            f"{ctx.device.type}: install a build with it, or leave {key} out"
        )


def _device_mesh(device: torch.device, world_size: int) -> Any:
    """A 1-D mesh over every rank. Made outside any fake mode: the mesh reads its ranks'
    indices as values, which a fake tensor does not have (the estimate traces under one)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        return init_device_mesh(device.type, (world_size,))


class ShardedPlacement(Placement):
    """The model sharded in place by FSDP2: its parameters become DTensor shards that the
    optimizer steps, on the device or, with ``offload``, on the host."""

    # clip_grad_norm_ works on the sharded grads: their norm is a DTensor whose all-reduce
    # spans every rank, so each clips by the global norm.
    clips_gradients = True
    shards = True

    def __init__(self, model: nn.Module, ctx: RunContext, offload: bool) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        # FSDP warns once that the root returned a view (the logits); nothing here changes
        # them in place, which is the case the warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.ranks = ensure_process_group(ctx.device)
        mesh = _device_mesh(ctx.device, self.ranks.world_size)
        # Pinned host memory lets the copies to and from a GPU overlap compute; on a CPU
        # run there is no copy to speed up, and pinning needs an accelerator.
        policy = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if offload else OffloadPolicy()
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


def describe_sharding(model: nn.Module, layer_unit: str, where: str) -> dict[str, Any]:
    """The facts both FSDP strategies record: world size, units, resharding, where the state lives."""
    from torch.distributed.fsdp import FSDPModule

    world_size = torch.distributed.get_world_size()
    units = sum(isinstance(module, FSDPModule) for module in model.modules())
    return {
        "fsdp_world_size": world_size,
        "fsdp_sharding": f"every parameter split on dim 0 across {world_size} rank(s); {units} units "
                         f"({units - 1} transformer layers and the root)",
        "fsdp_layer_unit": layer_unit,
        "reshard_after_forward": f"layers: {LAYER_RESHARD}; root (embeddings, LM head): {ROOT_RESHARD}",
        "fsdp_state": where,
    }


class ShardedStrategy(Strategy):
    """What ``fsdp`` and ``fsdp-offload`` do alike: the checks, the placement and the sharding
    facts. Each declares its own facts in its own file, and where its shards live here."""

    #: Whether the shards live on the host (FSDP's CPU offload policy) rather than the device.
    offload: ClassVar[bool] = False
    #: Where the state lives, as the facts say it.
    state_where: ClassVar[str] = ""

    def device_refusal(self, ctx: RunContext) -> None:
        fsdp_device_refusal(self.key, ctx, offload=self.offload)

    def placement(self, model: nn.Module, ctx: RunContext) -> Placement:
        placement = ShardedPlacement(model, ctx, offload=self.offload)
        self.layer_unit = placement.layer_unit
        return placement

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        return describe_sharding(model, getattr(self, "layer_unit", "?"), self.state_where)


#: What neither FSDP strategy can run with, and why (each adds its own).
SHARDED_INCOMPATIBLE = {
    key: "bitsandbytes' 8-bit update cannot step FSDP's DTensor parameters" for key in ("3", "paged-adam8bit")
}
