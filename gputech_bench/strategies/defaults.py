"""What a cell does on a hook that none of its strategies owns: the seed's baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.masking import IGNORE_INDEX
from .base import MicroBatch, Placement, Predictions, Predictor, RunContext, TokenLoss, TokenRows


class InPlacePlacement(Placement):
    """Weights, gradients and optimizer state all live in the model on the compute device."""

    clips_gradients = True

    def __init__(self, model: nn.Module, ctx: RunContext) -> None:
        self.compute_model = model.to(ctx.device)
        self.compute_dtype = next(model.parameters()).dtype

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.compute_model.parameters() if p.requires_grad]


def build_adamw(params: list[torch.Tensor], ctx: RunContext) -> torch.optim.Optimizer:
    train = ctx.config.train
    # foreach=False: torch 2's default multi-tensor path allocates temporaries for
    # all parameters at once; the seed's 2022 torch updated tensor by tensor, and so
    # does this, to keep the baseline's optimizer-step peak comparable.
    return torch.optim.AdamW(params, lr=train.lr, eps=train.adam_eps, weight_decay=train.weight_decay, foreach=False)


def whole_batch(batch: dict[str, torch.Tensor], ctx: RunContext) -> list[MicroBatch]:
    return [MicroBatch(batch, 1.0)]


def model_cross_entropy(upcast: bool) -> TokenLoss:
    """The innermost loss: the model's head at every row it is given, then the cross-entropy
    its own forward computes, the mean over the rows that carry a target. ``upcast``: in fp32,
    as transformers' causal-LM loss upcasts its logits (a masked-LM's loss takes the scores'
    dtype, as BertForMaskedLM's does)."""

    def loss(rows: TokenRows) -> torch.Tensor:
        scores = rows.head(rows.hidden)
        return F.cross_entropy(scores.float() if upcast else scores, rows.targets, ignore_index=IGNORE_INDEX)

    return loss


def argmax_tokens(rows: TokenRows) -> torch.Tensor:
    """The innermost predictor: the head at every row it is given, and its argmax."""
    return rows.head(rows.hidden).argmax(dim=-1)


def logits_predictor(model: nn.Module, causal: bool) -> Predictor:
    """Evaluation through the model's own forward: the full logits' argmax and the model's
    loss. A causal LM's prediction at the last position has no next token to score."""

    def predict(inputs: dict[str, torch.Tensor]) -> Predictions:
        output = model(**inputs)
        logits = output.logits[:, :-1] if causal else output.logits
        return Predictions(predicted=logits.argmax(dim=-1), loss=output.loss)

    return Predictor(model, predict)
