"""Strategy 2: micro-batches with gradient accumulation (the seed's 8 x 4)."""

from __future__ import annotations

import torch

from ..data.masking import IGNORE_INDEX
from ..errors import StrategyError
from .base import MicroBatch, RunContext, Strategy
from .facts import MicroBatchTimeFactor, StateLocation, TRACED
from .registry import register


def scored_tokens(labels: torch.Tensor, next_token: bool = False) -> int:
    """Positions the model's loss averages over. A causal LM shifts its labels by one, so
    each row's first label is never a target."""
    return int(((labels[:, 1:] if next_token else labels) != IGNORE_INDEX).sum())


def split_into_micro_batches(
    batch: dict[str, torch.Tensor], micro_batch_size: int, accumulation_steps: int, loss_rule: str,
    next_token: bool = False,
) -> list[MicroBatch]:
    """Slice ``batch`` along dim 0 and weight each slice's mean loss.

    ``seed``: every micro-batch loss is divided by the accumulation step count, even
    in a short last batch, exactly as the seed's loop did.
    ``token-weighted``: weight = masked tokens in the slice / masked tokens in the
    batch, so the summed gradient equals the full batch's (the model's loss is a
    mean over masked tokens, and slices hold different numbers of them).
    """
    size = batch["input_ids"].shape[0]
    slices = [slice(start, min(start + micro_batch_size, size)) for start in range(0, size, micro_batch_size)]
    masked_total = scored_tokens(batch["labels"], next_token)
    micro_batches = []
    for part in slices:
        inputs = {name: tensor[part] for name, tensor in batch.items()}
        if loss_rule == "token-weighted":
            masked = scored_tokens(inputs["labels"], next_token)
            if masked == 0:
                continue  # its mean loss is undefined and its weight would be 0
            weight = masked / masked_total
        else:
            weight = 1.0 / accumulation_steps
        micro_batches.append(MicroBatch(inputs, weight))
    return micro_batches


@register
class Accumulation(Strategy):
    key = "2"
    name = "accumulation"
    saves = "activations: only one micro-batch (8 of 32 samples) is in flight at a time"
    costs = "smaller matmuls and 4 forward/backward launches per step (the seed measured 1.6x the time)"
    order = 20
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = MicroBatchTimeFactor(0.2, "measured: reproduces the seed's 1.6x for 8x4 micro-batches on an A30")
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = (2, 4, 8, 16)
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    gives_up = "with the seed's /k loss rule, a short last batch counts less (accumulation_loss=token-weighted avoids it)"

    requires = "strategy.micro_batch_size must divide train.batch_size into 2 or more micro-batches"

    def config_refusal(self, config) -> None:
        batch, micro = config.train.batch_size, config.strategy.micro_batch_size
        if micro >= batch or batch % micro:
            raise StrategyError(
                f"strategy 2 needs strategy.micro_batch_size ({micro}) to divide train.batch_size ({batch}) "
                "into 2 or more micro-batches: change one of them with --set"
            )

    def device_refusal(self, ctx: RunContext) -> None:
        micro, rows = ctx.config.strategy.micro_batch_size, ctx.rank_batch_size
        if ctx.world_size > 1 and (micro >= rows or rows % micro):
            raise StrategyError(
                f"strategy 2 needs strategy.micro_batch_size ({micro}) to divide each rank's {rows} rows "
                f"(train.batch_size / {ctx.world_size} ranks) into 2 or more micro-batches: lower it with --set"
            )

    def split_batch(self, batch: dict[str, torch.Tensor], ctx: RunContext) -> list[MicroBatch]:
        micro = ctx.config.strategy.micro_batch_size
        # Per rank: with several ranks each splits its own share of the batch.
        steps = ctx.rank_batch_size // micro
        return split_into_micro_batches(batch, micro, steps, ctx.config.strategy.accumulation_loss,
                                        next_token=ctx.config.data.objective == "clm")

    def rows_per_forward(self, ctx: RunContext) -> int:
        return ctx.config.strategy.micro_batch_size

    def describe(self, model, ctx: RunContext) -> dict:
        micro = ctx.config.strategy.micro_batch_size
        facts = {
            "micro_batch_size": micro,
            "accumulation_steps": ctx.config.train.batch_size // micro,
            "accumulation_loss": ctx.config.strategy.accumulation_loss,
        }
        if ctx.config.data.objective == "seed":
            # Every position carries a label there, so "masked tokens" are all positions.
            facts["accumulation_loss_under_objective"] = (
                "data.objective=seed labels every position, so both rules weigh micro-batches by their rows: "
                "they agree except in a short last batch, which token-weighted counts in full"
            )
        return facts
