"""Training batches: the same order and the same masks in every cell of a run."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..data import MaskingSpec, TokenizedSplit, apply_objective, masks_are_static
from .seeding import generator


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    # The seed's DataLoader kept the short last batch (drop_last=False).
    return math.ceil(num_samples / batch_size)


def training_masks_stream(seed: int, objective: str, epoch: int) -> torch.Generator:
    """The random stream of an epoch's masks: one per epoch, or one per run for an
    objective whose masks are drawn once (the seed's dataset masked when it was built)."""
    if masks_are_static(objective):
        return generator(seed, "train-masks")
    return generator(seed, "train-masks", epoch)


def epoch_batches(
    split: TokenizedSplit, spec: MaskingSpec | None, batch_size: int, seed: int, epoch: int, objective: str
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffle each epoch and mask as ``objective`` says, from streams that depend only on
    (seed, epoch)."""
    masked = apply_objective(objective, split.input_ids, spec, training_masks_stream(seed, objective, epoch),
                             split.attention_mask)
    order = torch.randperm(len(split), generator=generator(seed, "train-order", epoch))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        yield {
            "input_ids": masked.input_ids[index],
            "attention_mask": split.attention_mask[index],
            "labels": masked.labels[index],
        }


def rank_share(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a batch: every rank walks the same batches and takes its slice,
    so that N ranks train on exactly the batches of one process."""
    return {name: tensor.tensor_split(world_size)[rank] for name, tensor in batch.items()}
