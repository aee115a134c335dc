"""fsdp-offload: PyTorch FSDP2 with CPU offload (ZeRO-Offload style).

Parameters, gradients and optimizer state live on the host as DTensor shards; each
transformer layer, then the root, is gathered onto the compute device only while it runs
(the units and the mesh are ``sharded.py``'s, shared with ``fsdp``). With world size N (a
torchrun launch) every rank keeps 1/N of each on its host; a lone process keeps all of it,
in a process group of one.
"""

from __future__ import annotations

from torch import nn

from .base import RunContext
from .facts import StateLocation, TimeFactor, modelled_by
from .registry import register
from .sharded import LAYER_RESHARD, ROOT_RESHARD, SHARDED_INCOMPATIBLE, ShardedStrategy

__all__ = ["FsdpOffload", "LAYER_RESHARD", "ROOT_RESHARD"]


@register
class FsdpOffload(ShardedStrategy):
    key = "fsdp-offload"
    name = "fsdp-offload"
    saves = "device memory: weights, grads and optimizer state stay on the host; only the running layer is on the device"
    costs = "a host->device copy of every layer in forward and again in backward, grads back to the host, a CPU optimizer step"
    order = 45
    shards = True
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
    incompatible = dict(SHARDED_INCOMPATIBLE)

    untraceable = ("a fake-tensor trace runs no collective with FSDP's CPU offload: it keeps host and device apart "
                   "only on the meta stand-in, where FSDP2 has no device mesh (fsdp, without offload, is traced)")

    offload = True  # its parameters become host DTensors that the optimizer steps
    state_where = "host (CPU offload)"

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        facts = super().describe(model, ctx)
        facts.update(
            cpu_offload="parameters, gradients and optimizer state on the host; one unit at a time on the device",
            optimizer_device="cpu",
        )
        return facts
