"""fsdp: PyTorch FSDP2 full sharding, the state on the device (ZeRO-3 style).

Each rank keeps 1/N of every parameter, gradient and optimizer state on its own GPU;
each transformer layer, then the root, is all-gathered while it runs and its gradients
reduce-scattered after its backward (the units are ``sharded.py``'s, shared with
fsdp-offload, which keeps the same shards on the host instead). A lone process holds all
of it in a process group of one: the same code path, nothing saved.
"""

from __future__ import annotations

from .facts import TRACED, StateLocation, TimeFactor
from .registry import register
from .sharded import SHARDED_INCOMPATIBLE, ShardedStrategy


@register
class Fsdp(ShardedStrategy):
    key = "fsdp"
    name = "fsdp"
    saves = "device memory: each of N ranks keeps 1/N of the weights, grads and optimizer state; a layer is whole only while it runs"
    costs = "an all-gather of every layer in forward and again in backward, and a reduce-scatter of its grads (1.5x DDP's traffic)"
    order = 44
    shards = True
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.1, "assumed, not measured: FSDP moves 1.5x the bytes of DDP's all-reduce (two "
                             "all-gathers and a reduce-scatter), mostly overlapped with compute within a node")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = "torch >= 2.6 with torch.distributed (FSDP2 fully_shard); gloo on CPU, nccl on CUDA"
    incompatible = {
        **SHARDED_INCOMPATIBLE,
        "optimizer-in-backward": "FSDP writes each sharded gradient after its reduce-scatter, not through "
                                 "autograd's accumulation, so no backward hook would ever step it",
        "qlora": "FSDP2 shards parameters only: the 4-bit weights would become plain uint8 DTensors that "
                 "bitsandbytes rebuilds at every forward, their quantisation constants left unsharded",
    }

    untraceable = ""

    offload = False  # its parameters become device DTensors that the optimizer steps
    state_where = "device (1/N of each per rank)"
