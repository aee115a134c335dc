"""BERT's masked-language-model corruption (the 80/10/10 rule), as a pure function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DataError

# Label value that torch.nn.CrossEntropyLoss (and HF models) ignore.
IGNORE_INDEX = -100
# Of the chosen positions: 80% become [MASK], 10% a random token, 10% stay as they are.
MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1


@dataclass(frozen=True)
class MaskingSpec:
    """What mask_tokens needs to know about the tokenizer.

    `vocab_size` is the number of real tokenizer tokens (len(tokenizer)); random
    replacements are drawn from [0, vocab_size), never from embedding-table padding.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: tuple[int, ...]
    probability: float = 0.15

    def __post_init__(self) -> None:
        # Accept any iterable of ints but store a sorted tuple, so equal specs compare equal.
        object.__setattr__(self, "special_token_ids", tuple(sorted({int(i) for i in self.special_token_ids})))
        if self.mask_token_id is None:
            raise DataError("the tokenizer has no mask token: use a tokenizer built for masked-LM, e.g. a BERT one")
        if not 0.0 < self.probability < 1.0:
            raise DataError(
                f"masking probability must be between 0 and 1 (got {self.probability}): use e.g. 0.15 as in BERT"
            )
        if self.vocab_size < 1:
            raise DataError(f"vocab size must be positive (got {self.vocab_size}): pass len(tokenizer)")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DataError(
                f"mask token id {self.mask_token_id} is outside the vocab [0, {self.vocab_size}): "
                f"pass the tokenizer's mask_token_id and len(tokenizer)"
            )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, probability: float = 0.15) -> MaskingSpec:
        """The spec for a transformers tokenizer: its [MASK] id, len() and all special ids."""
        if tokenizer.mask_token_id is None:
            raise DataError(
                f"tokenizer '{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}' has no mask token: "
                f"use a tokenizer built for masked-LM, e.g. a BERT tokenizer"
            )
        return cls(
            mask_token_id=int(tokenizer.mask_token_id),
            vocab_size=len(tokenizer),
            special_token_ids=tuple(tokenizer.all_special_ids),
            probability=probability,
        )


def mask_tokens(
    input_ids: torch.Tensor,
    spec: MaskingSpec,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt `input_ids` for masked-LM training; returns (masked_input_ids, labels).

    Each non-special position is chosen with probability `spec.probability`. Chosen
    positions get their original id as label (all others IGNORE_INDEX) and are
    replaced by [MASK] (80%), a random token (10%) or left unchanged (10%).
    `input_ids` is not modified. The output depends only on the inputs and the
    generator's state; random numbers are drawn on the generator's device and
    moved to the input's device.
    """
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be a LongTensor, got {input_ids.dtype}")
    shape, draw_device = input_ids.shape, generator.device
    # Always draw all three full-size tensors, in a fixed order, so the generator
    # advances by the same amount per batch whatever the content: masking of a later
    # batch then does not depend on what was in earlier ones.
    selection_draw = torch.rand(shape, generator=generator, device=draw_device)
    action_draw = torch.rand(shape, generator=generator, device=draw_device)
    random_ids = torch.randint(spec.vocab_size, shape, generator=generator, device=draw_device, dtype=torch.long)
    selection_draw, action_draw, random_ids = (
        t.to(input_ids.device) for t in (selection_draw, action_draw, random_ids)
    )

    special_ids = torch.tensor(spec.special_token_ids, dtype=torch.long, device=input_ids.device)
    is_special = torch.isin(input_ids, special_ids)
    chosen = (selection_draw < spec.probability) & ~is_special

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    use_mask_token = chosen & (action_draw < MASK_TOKEN_SHARE)
    random_upper_bound = MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE
    use_random_token = chosen & (action_draw >= MASK_TOKEN_SHARE) & (action_draw < random_upper_bound)
    masked = torch.where(use_random_token, random_ids, input_ids)
    masked = torch.where(use_mask_token, torch.full_like(input_ids, spec.mask_token_id), masked)
    return masked, labels
