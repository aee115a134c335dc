"""Which GPUs a run uses: ``--gpus``, read within the CUDA_VISIBLE_DEVICES the runner inherited.

A scheduler (slurm, Kubernetes) hands a job its GPUs through CUDA_VISIBLE_DEVICES.
Inside that allocation the job sees GPUs 0..n-1, so ``--gpus`` counts within the
inherited list: ``--gpus 0,1`` under ``CUDA_VISIBLE_DEVICES=4,5,6,7`` means the GPUs
the runner calls 4 and 5. The result lists the entries as the runner's environment
names them, so that pinning a worker to them never leaves the allocation.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..errors import ConfigError

#: What CUDA accepts as one entry of CUDA_VISIBLE_DEVICES: an index, a GPU UUID or a MIG UUID.
GPU_ID = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$")

VARIABLE = "CUDA_VISIBLE_DEVICES"


def inherited_devices(environ: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list, or None when it is unset (every GPU is visible).

    Read as CUDA reads it: entries up to the first one that is not a GPU index or
    UUID, so "" and "-1" are an empty list (no GPU visible), not "every GPU"."""
    value = environ.get(VARIABLE)
    if value is None:
        return None
    devices = []
    for entry in (part.strip() for part in value.split(",")):
        if not GPU_ID.match(entry):
            break
        devices.append(entry)
    return devices


def parse_gpus(gpus: str) -> list[str]:
    """``--gpus`` as a list of entries, refusing what CUDA_VISIBLE_DEVICES could not hold."""
    ids = [item.strip() for item in gpus.split(",")]
    if not all(ids) or not all(GPU_ID.match(item) for item in ids):
        raise ConfigError(f"--gpus '{gpus}' is not a list of GPU indices: pass e.g. --gpus 0,1,2,3 (as nvidia-smi numbers them)")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus '{gpus}' names a GPU twice: list each GPU once")
    return ids


def run_devices(gpus: str | None, environ: Mapping[str, str]) -> list[str] | None:
    """The GPUs the run uses, as the runner's environment names them; None means every GPU.

    Without --gpus that is the inherited list (or every GPU); with it, each entry read
    within the inherited list. An entry outside the allocation is refused before any
    process starts: pinned there, a cell would use a GPU the scheduler gave to someone else."""
    inherited = inherited_devices(environ)
    if gpus is None:
        return inherited
    ids = parse_gpus(gpus)
    if inherited is None:
        return ids
    shown = f"{VARIABLE}={','.join(inherited)}" if inherited else f"{VARIABLE}='{environ.get(VARIABLE, '')}' (no GPU)"
    mapped = []
    for entry in ids:
        if entry.isdigit():
            if int(entry) >= len(inherited):
                fix = (f"--gpus counts within that list, so pass indices 0..{len(inherited) - 1}" if inherited
                       else f"drop --gpus, or unset {VARIABLE}")
                raise ConfigError(f"--gpus {entry} is outside the {len(inherited)} GPU(s) that {shown} gives this run: {fix}")
            mapped.append(inherited[int(entry)])
        else:
            # UUIDs name the GPU itself, so one outside the list would escape the allocation.
            match = next((device for device in inherited if device.lower() == entry.lower()), None)
            if match is None:
                raise ConfigError(
                    f"--gpus {entry} is not among the GPUs that {shown} gives this run: "
                    f"pass a UUID from that list, or an index into it"
                )
            mapped.append(match)
    if len(set(mapped)) != len(mapped):
        raise ConfigError(f"--gpus '{gpus}' names a GPU of {shown} twice (by index and by UUID): list each GPU once")
    return mapped
