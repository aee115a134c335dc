"""The one training loop every cell runs; strategies act only through the plan's hooks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data import MaskingSpec, TokenizedSplit
from ..measure.timing import SyncedStopwatch
from ..measure.tracker import StepMemoryTracker, TrackedPeak
from ..strategies import RunContext, TrainingPlan
from .batches import epoch_batches, rank_share, steps_per_epoch
from .schedule import linear_schedule_with_warmup


@dataclass(frozen=True)
class StepEvent:
    """Progress of one optimizer step, for whoever displays it."""

    step: int  # 1-based
    total_steps: int
    epoch: int  # 0-based
    loss: float
    seconds: float
    tracked: bool


@dataclass
class TrainOutcome:
    steps_run: int
    total_steps: int
    steps_per_epoch: int
    samples_per_epoch: int
    #: Wall time of each timed optimizer step (not the warm-up, not the tracked one), device synchronised.
    step_seconds: list[float] = field(default_factory=list)
    #: Seconds of the first step: lazy initialisation and allocator warm-up, never part of the timing.
    first_step_seconds: float | None = None
    #: Seconds of the step that ran under the memory tracker (never part of the timing).
    tracked_step_seconds: float | None = None
    tracked_peaks: list[TrackedPeak] = field(default_factory=list)
    #: Per complete epoch: its timed steps, plus the mean step time for each untimed one.
    epoch_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    nonfinite_losses: int = 0
    #: Steps on an epoch's short last batch kept out of the timing, because the model
    #: recompiles for the new shape there (torch.compile).
    untimed_short_batches: int = 0

    @property
    def mean_step_seconds(self) -> float | None:
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None

    @property
    def epoch_time(self) -> tuple[float | None, str]:
        """(seconds per epoch, how it was obtained)."""
        short = (
            f"; the short last batch of an epoch ({self.untimed_short_batches} step(s)) recompiles under "
            "torch.compile, so it counts at the mean step time too"
            if self.untimed_short_batches else ""
        )
        if self.epoch_seconds:
            return (
                sum(self.epoch_seconds) / len(self.epoch_seconds),
                f"mean of {len(self.epoch_seconds)} complete epoch(s), training steps only, device synchronised; "
                f"the warm-up and memory-tracked steps count at the mean step time{short}",
            )
        if self.mean_step_seconds is None:
            return None, "no step was timed: the first (warm-up) and the memory-tracked steps never are; raise train.max_steps"
        return (
            self.mean_step_seconds * self.steps_per_epoch,
            f"extrapolated: mean of {len(self.step_seconds)} timed step(s) x {self.steps_per_epoch} steps per epoch",
        )


def planned_steps(num_samples: int, batch_size: int, epochs: int, max_steps: int) -> int:
    full = steps_per_epoch(num_samples, batch_size) * epochs
    return min(full, max_steps) if max_steps else full


def accumulate_gradients(
    plan: TrainingPlan,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    before_forward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Forward and backward every micro-batch of ``batch``; returns the weighted loss."""
    step_loss = torch.zeros((), device=device)
    for micro in plan.split_batch(batch):
        if before_forward:
            before_forward()
        # Move each micro-batch on its own: the device only ever holds one.
        inputs = {name: tensor.to(device, non_blocking=True) for name, tensor in micro.inputs.items()}
        with plan.precision.autocast():
            # The model's own loss, or, where a strategy overrides wrap_loss, the cell's loss
            # hooks on its final hidden states (the plan's HiddenStateModel).
            loss = plan.model(**inputs).loss
        plan.precision.backward(loss * micro.loss_weight if micro.loss_weight != 1.0 else loss)
        step_loss += loss.detach().float() * micro.loss_weight
    return step_loss


def optimizer_step(
    plan: TrainingPlan,
    scheduler,
    batch: dict[str, torch.Tensor],
    ctx: RunContext,
    before_forward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Gradients of one batch, then one update. Returns the step's loss."""
    step_loss = accumulate_gradients(plan, batch, ctx.device, before_forward)
    plan.placement.before_step()
    max_norm = ctx.config.train.max_grad_norm
    if plan.clips_gradients and max_norm > 0:
        plan.precision.unscale(plan.optimizer)
        torch.nn.utils.clip_grad_norm_(plan.placement.optimizer_parameters(), max_norm)
    plan.precision.step(plan.optimizer)
    scheduler.step()
    plan.optimizer.zero_grad(set_to_none=True)
    plan.placement.after_step()
    return step_loss


WARMUP_STEP = 0


def memory_tracked_step(total_steps: int) -> int:
    """Track the second step when there is one: the first runs before the optimizer
    state exists, so its forward and backward would miss that state in the peak."""
    return 1 if total_steps > 1 else 0


def train(
    plan: TrainingPlan,
    split: TokenizedSplit,
    masking: MaskingSpec | None,
    ctx: RunContext,
    on_step: Callable[[StepEvent], None] | None = None,
) -> TrainOutcome:
    settings = ctx.config.train
    per_epoch = steps_per_epoch(len(split), settings.batch_size)
    total = planned_steps(len(split), settings.batch_size, settings.epochs, settings.max_steps)
    # The schedule spans the steps actually run, so a short run is a complete small recipe.
    scheduler = linear_schedule_with_warmup(plan.optimizer, int(settings.warmup_ratio * total), total)
    outcome = TrainOutcome(0, total, per_epoch, len(split))
    plan.model.train()

    tracked_step = memory_tracked_step(total) if settings.track_memory else -1
    step = 0
    for epoch in range(math.ceil(total / per_epoch)):
        epoch_timed: list[float] = []
        epoch_untimed = 0
        for batch in epoch_batches(split, masking, settings.batch_size, settings.seed, epoch, ctx.config.data.objective):
            if step >= total:
                break
            # A recompiling model's step on a new (short) batch shape is compilation, not training.
            recompiles = plan.recompiles_on_new_shapes and len(batch["input_ids"]) < settings.batch_size
            if ctx.world_size > 1:
                batch = rank_share(batch, ctx.rank, ctx.world_size)
            tracked = step == tracked_step
            watch = SyncedStopwatch(ctx.device)
            if tracked:
                tracker = StepMemoryTracker(plan.model, plan.optimizer, *plan.placement.tracked_objects())
                with watch, tracker:
                    loss = optimizer_step(plan, scheduler, batch, ctx, tracker.before_forward)
                outcome.tracked_peaks = tracker.peaks()
                outcome.tracked_step_seconds = watch.seconds
            else:
                with watch:
                    loss = optimizer_step(plan, scheduler, batch, ctx)
            if step == WARMUP_STEP:
                outcome.first_step_seconds = watch.seconds
            never_timed = tracked or step == WARMUP_STEP
            if recompiles and not never_timed:
                outcome.untimed_short_batches += 1
            if never_timed or recompiles:
                epoch_untimed += 1
            else:
                outcome.step_seconds.append(watch.seconds)
                epoch_timed.append(watch.seconds)
            step += 1
            value = float(loss)
            outcome.losses.append(value)
            outcome.nonfinite_losses += 0 if math.isfinite(value) else 1
            if on_step:
                on_step(StepEvent(step, total, epoch, value, watch.seconds, tracked))
        completed = len(epoch_timed) + epoch_untimed == per_epoch
        if completed and epoch_timed:
            mean = sum(epoch_timed) / len(epoch_timed)
            outcome.epoch_seconds.append(sum(epoch_timed) + epoch_untimed * mean)
    outcome.steps_run = step
    return outcome
