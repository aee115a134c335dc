"""The training objective: which positions are masked, how, and which carry a label.

Two objectives, chosen with ``data.objective``:

``seed``  what the seed's notebook trained (``MLMDataset`` in the author's
          ``myutils/bwpdataset.py``): the labels are the whole input ids, padding
          included, so the loss is the cross-entropy over every position; 15% of the
          non-special positions become ``[MASK]`` (no 80/10/10 rule); the masks are
          drawn once per run, so every epoch sees the same masked sentences.
``mlm``   today's standard masked-LM (BERT's, and transformers'
          ``DataCollatorForLanguageModeling``): labels only at the chosen positions,
          80/10/10 corruption, masks drawn afresh each epoch.
``clm``   a causal LM's next-token prediction: nothing is masked; every real token is a
          label (the model shifts them by one), padding is not.

Under either objective ``masked`` marks the positions chosen for masking, which is what
the masked accuracy scores; the labels say what the loss scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import IGNORE_INDEX, MaskingSpec, mask_tokens

#: The 2022 reference study's own objective; users know it by the name "seed".
REFERENCE_OBJECTIVE = "seed"
MLM = "mlm"
CLM = "clm"


@dataclass(frozen=True)
class MaskedTokens:
    """One objective applied to a tensor of token ids."""

    input_ids: torch.Tensor  # what the model sees
    labels: torch.Tensor  # what the loss scores (IGNORE_INDEX where nothing is scored)
    masked: torch.Tensor  # bool: the positions chosen for masking


def reference_mask_tokens(input_ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator) -> MaskedTokens:
    """The seed's corruption: every chosen position becomes [MASK], every position is a label.

    A position is chosen with probability ``spec.probability`` unless its token is special
    ([CLS], [SEP], [UNK], [PAD] and the tokenizer's other special tokens), as the seed's
    ``MLMDataset`` did. The labels are a copy of the input ids, so padding is scored too.
    """
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be a LongTensor, got {input_ids.dtype}")
    draw = torch.rand(input_ids.shape, generator=generator, device=generator.device).to(input_ids.device)
    special_ids = torch.tensor(spec.special_token_ids, dtype=torch.long, device=input_ids.device)
    chosen = (draw < spec.probability) & ~torch.isin(input_ids, special_ids)
    masked_ids = torch.where(chosen, torch.full_like(input_ids, spec.mask_token_id), input_ids)
    return MaskedTokens(masked_ids, input_ids.clone(), chosen)


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MaskedTokens:
    """A causal LM's targets: every real token (the model shifts them by one position);
    padding carries no label, so it never enters the loss."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return MaskedTokens(input_ids, labels, torch.zeros_like(input_ids, dtype=torch.bool))


def apply_objective(
    objective: str,
    input_ids: torch.Tensor,
    spec: MaskingSpec | None,
    generator: torch.Generator,
    attention_mask: torch.Tensor | None = None,
) -> MaskedTokens:
    """Mask ``input_ids`` the way ``objective`` trains; the result depends only on the inputs
    and the generator's state. ``clm`` masks nothing and needs the attention mask."""
    if objective == CLM:
        if attention_mask is None:
            raise ValueError("the clm objective needs the attention mask to leave padding out of the loss")
        return next_token_labels(input_ids, attention_mask)
    if spec is None:
        raise ValueError(f"the {objective} objective masks tokens: it needs a MaskingSpec")
    if objective == REFERENCE_OBJECTIVE:
        return reference_mask_tokens(input_ids, spec, generator)
    if objective == MLM:
        masked_ids, labels = mask_tokens(input_ids, spec, generator)
        return MaskedTokens(masked_ids, labels, labels != IGNORE_INDEX)
    raise ValueError(f"unknown objective {objective!r}: choose {REFERENCE_OBJECTIVE}, {MLM} or {CLM}")


def masks_are_static(objective: str) -> bool:
    """Whether every epoch trains on the same masked sentences (the seed's dataset masked
    once, when it was built)."""
    return objective == REFERENCE_OBJECTIVE
