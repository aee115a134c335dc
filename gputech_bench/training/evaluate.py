"""Eval metrics. A masked-LM: masked-token accuracy (the honest one) and the seed's
all-token accuracy. A causal LM: next-token accuracy and perplexity. Both: the objective's loss."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..data import IGNORE_INDEX
from ..data.prepare import EvalSet
from ..strategies.base import Predictor


@dataclass(frozen=True)
class EvalScores:
    masked_accuracy: float
    token_accuracy: float
    #: The objective's loss: the mean cross-entropy over the labelled positions.
    loss: float
    masked_tokens: int
    scored_tokens: int
    labelled_tokens: int
    #: A causal LM's: the share of real next tokens predicted, and exp(loss).
    next_token_accuracy: float | None = None
    perplexity: float | None = None


def _eval_batches(eval_set: EvalSet, device: torch.device, batch_size: int):
    """Each eval batch on ``device``: its slice of the set, its labels, and the model's inputs."""
    for start in range(0, eval_set.input_ids.shape[0], batch_size):
        part = slice(start, start + batch_size)
        labels = eval_set.labels[part].to(device)
        inputs = {"input_ids": eval_set.input_ids[part].to(device),
                  "attention_mask": eval_set.attention_mask[part].to(device), "labels": labels}
        yield part, labels, inputs


@torch.no_grad()
def evaluate(
    predictor: Predictor,
    eval_set: EvalSet,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> EvalScores:
    """Score ``eval_set`` with the plan's ``predictor`` (the model's own logits, or the cell's
    predict hooks); ``autocast`` is the training's precision context, so evaluation runs in
    the precision the cell trains in."""
    if eval_set.next_token:
        return evaluate_next_token(predictor, eval_set, device, batch_size, autocast)
    model = predictor.model
    was_training = model.training
    model.eval()
    masked_correct = masked_total = token_correct = token_total = labelled_total = 0
    loss_sum = 0.0
    for part, labels, inputs in _eval_batches(eval_set, device, batch_size):
        with autocast():
            output = predictor.predict(inputs)
            predicted = output.predicted
        original = eval_set.original_ids[part].to(device)
        correct = predicted == original
        masked = eval_set.masked[part].to(device)
        masked_correct += int(correct[masked].sum())
        masked_total += int(masked.sum())
        # The model's loss is a mean over the labelled positions (all of them under the
        # seed's objective, the masked ones under mlm): weight each batch by its count.
        labelled = int((labels != IGNORE_INDEX).sum())
        if labelled:
            loss_sum += float(output.loss.float()) * labelled
            labelled_total += labelled
        # The seed's "eval accuracy": every non-padding position against the input ids,
        # so unmasked tokens (mostly copied through) count too.
        real = inputs["attention_mask"].bool()
        token_correct += int(correct[real].sum())
        token_total += int(real.sum())
    model.train(was_training)
    return EvalScores(
        masked_accuracy=masked_correct / masked_total if masked_total else float("nan"),
        token_accuracy=token_correct / token_total if token_total else float("nan"),
        loss=loss_sum / labelled_total if labelled_total else float("nan"),
        masked_tokens=masked_total,
        scored_tokens=token_total,
        labelled_tokens=labelled_total,
    )


@torch.no_grad()
def evaluate_next_token(
    predictor: Predictor,
    eval_set: EvalSet,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> EvalScores:
    """A causal LM's scores: at each real position but the last, is the argmax the next
    token? The loss is the model's own (shifted, padding ignored), weighted by each
    batch's count of scored positions; perplexity is its exponential."""
    model = predictor.model
    was_training = model.training
    model.eval()
    correct_total = scored_total = 0
    loss_sum = 0.0
    for _, labels, inputs in _eval_batches(eval_set, device, batch_size):
        with autocast():
            output = predictor.predict(inputs)
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        predicted = output.predicted  # position t's prediction of the token at t + 1
        count = int(scored.sum())
        if count:
            correct_total += int((predicted == targets)[scored].sum())
            loss_sum += float(output.loss.float()) * count
            scored_total += count
    model.train(was_training)
    loss = loss_sum / scored_total if scored_total else float("nan")
    return EvalScores(
        masked_accuracy=float("nan"),
        token_accuracy=float("nan"),
        loss=loss,
        masked_tokens=0,
        scored_tokens=scored_total,
        labelled_tokens=scored_total,
        next_token_accuracy=correct_total / scored_total if scored_total else float("nan"),
        perplexity=math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
    )
