"""Independent, reproducible random streams derived from the run's one seed."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *purpose: object) -> int:
    """A seed for one purpose (``"masks", epoch``), unaffected by how others are used.

    Separate streams keep the batches and masks identical across cells even though
    strategies consume the global RNG differently (LoRA init, dropout per micro-batch).
    """
    digest = hashlib.sha256("/".join(map(str, (seed, *purpose))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, *purpose: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *purpose))
