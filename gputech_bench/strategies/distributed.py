"""The process group that sharded strategies (FSDP) need, and nothing else.

Under ``torch.distributed.run`` every rank joins the launcher's group (env://: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A plain single-process run gets a private group
of one, so the same code path serves both.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import UserError

#: Whether this module initialised the default group, so ``shutdown`` never tears down
#: a group that its caller owns.
_created_here = False


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun launch; a lone process is rank 0 of 1."""
    return Ranks(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def backend_for(device: torch.device) -> str:
    if device.type == "cuda":
        # nccl moves the device tensors (the all-gathers and reduce-scatters). gloo
        # takes the collectives on host tensors: with CPU offload the sharded grads
        # live on the host, and clip_grad_norm_'s all-reduce of their norm fails with
        # "No backend type associated with device type cpu" on nccl alone.
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def bind_gpu(device: torch.device, ranks: Ranks) -> torch.device:
    """The GPU this process computes on, made current so that plain "cuda" means it.

    Under torchrun each rank takes the GPU of its local rank; a lone process keeps the
    one it was given."""
    if launched_by_torchrun():
        if device.index is not None and device.index != ranks.local_rank:
            raise UserError(
                f"rank {ranks.rank} was given {device} but torchrun assigned it cuda:{ranks.local_rank} (LOCAL_RANK): "
                "resolve the device as cuda:LOCAL_RANK, or as plain 'cuda'"
            )
        index = ranks.local_rank
    else:
        index = torch.cuda.current_device() if device.index is None else device.index
    gpu = torch.device("cuda", index)
    torch.cuda.set_device(gpu)
    return gpu


def ensure_process_group(device: torch.device) -> Ranks:
    """Join torchrun's group, or create a single-process one; a no-op when one exists."""
    global _created_here
    if dist.is_initialized():
        return Ranks(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    ranks = ranks_from_env()
    # device_id binds nccl to this rank's GPU at once rather than at its first collective.
    kwargs: dict[str, Any] = {"device_id": bind_gpu(device, ranks)} if device.type == "cuda" else {}
    if launched_by_torchrun():
        dist.init_process_group(backend=backend_for(device), **kwargs)  # env://
    else:
        # A HashStore lives in this process's memory: no port to pick and no file to
        # share, so two benchmark processes on one machine can never meet in a group.
        dist.init_process_group(
            backend=backend_for(device), store=dist.HashStore(), rank=0, world_size=1, **kwargs
        )
    _created_here = True
    return ranks


def shutdown() -> None:
    """Destroy the group ``ensure_process_group`` created; safe to call again, or with none."""
    global _created_here
    if _created_here and dist.is_initialized():
        dist.destroy_process_group()
    _created_here = False


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` replicated on every rank, its gradients averaged over the ranks in backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Ranks]:
    """Rank 0 of a *fake* process group of ``world_size`` for the length of the block: its
    collectives return at once without any other rank, so FSDP2's all-gathers and
    reduce-scatters trace on fake tensors (torchtitan's memory estimator does the same).
    Torn down afterwards, so that the next trace in the same process starts clean."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: a trace needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield Ranks(0, 0, world_size)
    finally:
        dist.destroy_process_group()
