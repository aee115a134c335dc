"""optimizer-in-backward: each parameter's optimizer step runs inside backward, and its
gradient is freed right after, so the gradients of the whole model never exist at once.

PyTorch's "How to save memory by fusing the optimizer step into the backward pass"
tutorial and torchtune's ``OptimizerInBackwardWrapper`` do this with one optimizer per
parameter. Here the cell's own optimizer (AdamW, or 3's 8-bit Adam) is kept whole and
stepped from each parameter's ``register_post_accumulate_grad_hook``: at that moment that
parameter is the only one holding a gradient, and every optimizer used here (torch's,
bitsandbytes', torchao's) skips parameters whose gradient is None, so ``step()`` updates
exactly that one. One optimizer means one state dict, one set of ``param_groups`` for the
LR schedule to drive, and the state the memory tracker already knows how to find.

Global-norm clipping needs every gradient before any step, which this forbids: the
strategy turns clipping off and says so (the result's ``turned_off`` fact, the table's
notes and ``gives_up``) rather than refusing, so that ``fit`` can weigh it under the
presets' own settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import StrategyError
from .base import RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register

CLIPPING_TURNED_OFF = (
    "gradient clipping (train.max_grad_norm={norm:g}): a step inside backward cannot wait for the global norm, "
    "so every update is unclipped"
)


class StepInBackward(torch.optim.Optimizer):
    """What the loop steps: ``inner``'s updates already ran in backward, one parameter at a
    time, so ``step()`` only checks that none was missed.

    ``param_groups`` and ``state`` are ``inner``'s own objects, not copies: the LR schedule's
    changes reach the updates in backward, and the memory tracker counts the real state."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.stepped_parameters = [p for group in inner.param_groups for p in group["params"]]
        # The base class sets up the hook tables LambdaLR and the tracker expect; its own
        # groups are then replaced by the inner optimizer's.
        super().__init__(self.stepped_parameters, dict(inner.defaults))
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.steps_in_backward = 0
        for parameter in self.stepped_parameters:
            parameter.register_post_accumulate_grad_hook(self._step_one)

    def _step_one(self, parameter: torch.Tensor) -> None:
        self.inner.step()
        # Freed here, not at zero_grad: this is the memory the strategy exists to save.
        parameter.grad = None
        self.steps_in_backward += 1

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise StrategyError("optimizer-in-backward steps inside backward: it cannot re-evaluate a closure")
        missed = sum(1 for p in self.stepped_parameters if p.grad is not None)
        if missed:
            # A gradient that reached .grad without autograd's accumulation (a placement that
            # copies or reduces gradients itself) was never stepped: stop, never skip it silently.
            raise StrategyError(
                f"optimizer-in-backward: {missed} parameter(s) got a gradient that no backward hook stepped; "
                "leave optimizer-in-backward out of this cell"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


@register
class OptimizerInBackward(Strategy):
    key = "optimizer-in-backward"
    name = "optimizer-in-backward"
    saves = "gradients: each is freed right after its parameter's update in backward, so the full set never exists"
    costs = "one optimizer call per parameter (Python overhead that grows with the parameter count); no clipping"
    order = 35
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(
        1.0,
        "reasoned: the same updates, moved into backward; torchtune reports no slowdown. Cost-model figure until "
        "a measured run replaces it",
    )
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = "one process (no --nproc-per-node above 1)"
    gives_up = "gradient clipping by the global norm (train.max_grad_norm is not applied)"
    allows_gradient_clipping = False
    incompatible = {
        "2": "accumulation sums micro-batches' gradients before one step, and each gradient here is "
             "stepped and freed in its own backward: there is nothing to accumulate into",
        "4": "its fp32 master copy on the host receives gradients only after backward, copied from the device: "
             "no gradient is accumulated there for a backward hook to step",
        "fsdp-offload": "FSDP writes each sharded gradient after its reduce-scatter, not through autograd's "
                        "accumulation, so no backward hook would ever step it",
        "amp-fp16": "its GradScaler must unscale every gradient and skip the step on inf/nan, which needs all "
                    "gradients before any step",
    }

    # DDP all-reduces gradients in buckets after they accumulate: a step inside backward
    # would use this rank's gradient alone, and the ranks' weights would drift apart.
    one_rank_only = "it steps each gradient before DistributedDataParallel averages it over the ranks"

    def device_refusal(self, ctx: RunContext) -> None:
        if ctx.world_size > 1:
            raise StrategyError(
                f"optimizer-in-backward: {self.one_rank_only} ({ctx.world_size} here): run it with one process per "
                "cell (--nproc-per-node 1)"
            )

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, ctx: RunContext) -> torch.optim.Optimizer:
        return StepInBackward(optimizer)

    def describe(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        norm = ctx.config.train.max_grad_norm
        facts: dict[str, Any] = {
            "optimizer_step": "in backward, one parameter at a time; each gradient freed after its update",
        }
        if norm > 0:
            facts["turned_off"] = [CLIPPING_TURNED_OFF.format(norm=norm)]
        return facts

