"""compile: ``torch.compile`` of the model (TorchInductor).

Fused kernels keep fewer intermediate tensors alive and launch fewer kernels. The
price is compilation, paid in the first step (and again in evaluation, whose
no-grad graph differs); the training loop never times the first step, and the cell
reports compilation apart as ``compile_seconds``.
"""

from __future__ import annotations

from torch import nn

from .base import RunContext, Strategy
from .facts import NOT_ESTIMATED, StateLocation, TimeFactor
from .registry import register


@register
class Compile(Strategy):
    key = "compile"
    name = "compile"
    saves = "temporaries: fused kernels keep fewer intermediates alive (small; mostly a speed strategy)"
    costs = "compilation in the first step (tens of seconds; minutes for big models), reported as compile_seconds"
    # Last: it compiles the model as the other strategies left it (adapters, head wrapper).
    order = 90
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "assumed: not modelled, its gain depends on the device (not estimated, so fit never weighs it)")
    changes_activations_only = True
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = NOT_ESTIMATED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = "a C++ compiler on CPU; Triton on CUDA"
    untraceable = "Inductor's fused kernels allocate differently from the eager step the estimate follows"
    recompiles_on_new_shapes = True

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        # In place (not torch.compile(model)): the module keeps its identity and class,
        # so placements, peft and the memory tracker see the same object.
        model.compile()
        return model

    def describe(self, model: nn.Module, ctx: RunContext) -> dict:
        return {"compiler": "torch.compile (inductor, default mode), compiled in place"}
