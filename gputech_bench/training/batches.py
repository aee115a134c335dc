"""Training batches: the same order and the same masks in every cell of a run."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..data import MaskingSpec, TokenizedSplit, mask_tokens
from .seeding import generator


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    # The seed's DataLoader kept the short last batch (drop_last=False).
    return math.ceil(num_samples / batch_size)


def epoch_batches(
    split: TokenizedSplit, spec: MaskingSpec, batch_size: int, seed: int, epoch: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffle and mask afresh each epoch, from streams that depend only on (seed, epoch)."""
    masked_ids, labels = mask_tokens(split.input_ids, spec, generator(seed, "train-masks", epoch))
    order = torch.randperm(len(split), generator=generator(seed, "train-order", epoch))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        yield {
            "input_ids": masked_ids[index],
            "attention_mask": split.attention_mask[index],
            "labels": labels[index],
        }


def rank_share(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a batch: every rank walks the same batches and takes its slice,
    so that N ranks train on exactly the batches of one process."""
    return {name: tensor.tensor_split(world_size)[rank] for name, tensor in batch.items()}
