"""Where a cell's worker runs: which GPUs it sees, and torchrun's options when it starts it.

``--gpus 0,1,2,3`` turns the GPUs into slots: one cell runs per slot at a time, its
process pinned with ``CUDA_VISIBLE_DEVICES`` so that it sees its own GPUs only. Under an
inherited CUDA_VISIBLE_DEVICES (a scheduler's allocation) the indices count within it
(see gpu_selection), and a slot holds the inherited entries. With
``--nproc-per-node N`` each cell is launched by ``torch.distributed.run`` with N ranks,
and a slot holds N GPUs.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import Mapping

from ..errors import ConfigError
from ..measure.gpu_selection import run_devices

#: A slot's GPUs as the runner's CUDA_VISIBLE_DEVICES lists them (the physical GPUs when
#: nothing is inherited); None inherits the runner's environment.
Slot = tuple[str, ...] | None

_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-_:\[\]]+:\d+$")


@dataclass(frozen=True)
class Launch:
    """torchrun's options for every cell; the defaults are one plain process."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError("--nproc-per-node and --nnodes must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1}: number the nodes from 0")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the address of node 0 that every node can reach")
        if self.rdzv_endpoint and not _ENDPOINT.match(self.rdzv_endpoint):
            raise ConfigError(f"--rdzv-endpoint '{self.rdzv_endpoint}' is not HOST:PORT: pass e.g. 10.0.0.1:29500")

    def torchrun_options(self) -> list[str]:
        if self.nnodes == 1 and not self.rdzv_endpoint:
            # --standalone: a private rendezvous on a free local port, so that parallel
            # cells (--gpus) never collide on one.
            return ["--standalone", "--nproc-per-node", str(self.nproc_per_node)]
        # torchrun's static rendezvous: node 0 hosts the store at the endpoint, and
        # every node states its rank, so that global ranks are fixed in advance.
        return [
            "--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
            "--rdzv-endpoint", str(self.rdzv_endpoint), "--nproc-per-node", str(self.nproc_per_node),
        ]


def gpu_slots(gpus: str | None, nproc_per_node: int = 1, environ: Mapping[str, str] | None = None) -> list[Slot]:
    """``--gpus 0,1,2,3`` as slots of ``nproc_per_node`` GPUs each; no --gpus is one inherited slot.

    ``environ`` is the runner's environment (os.environ unless a test passes one):
    under its CUDA_VISIBLE_DEVICES the entries are indices into that list."""
    if gpus is None:
        return [None]
    ids = run_devices(gpus, os.environ if environ is None else environ) or []
    if len(ids) % nproc_per_node:
        raise ConfigError(
            f"--gpus lists {len(ids)} GPU(s), which --nproc-per-node {nproc_per_node} does not divide: "
            f"list a multiple of {nproc_per_node} GPUs"
        )
    return [tuple(ids[start:start + nproc_per_node]) for start in range(0, len(ids), nproc_per_node)]


def slot_environment(slot: Slot, base: dict[str, str]) -> dict[str, str]:
    # The slot already holds entries of the inherited list (gpu_slots mapped them), so
    # replacing the variable narrows the allocation and never widens it.
    environment = dict(base)
    if slot is not None:
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
    return environment


def die_with_parent() -> None:
    """In a child (before exec, or just after a fork): get SIGTERM when the parent dies, so
    that an orphaned worker stops and records it."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass  # not Linux: the worker notices through its broken stdout instead
