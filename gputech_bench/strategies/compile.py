"""compile: ``torch.compile`` of the model (TorchInductor).

Fused kernels keep fewer intermediate tensors alive and launch fewer kernels. The
price is compilation, paid in the first step (and again in evaluation, whose
no-grad graph differs); the training loop never times the first step, and the cell
reports compilation apart as ``compile_seconds``.
"""

from __future__ import annotations

from torch import nn

from .base import RunContext, Strategy
from .registry import register


@register
class Compile(Strategy):
    key = "compile"
    name = "compile"
    saves = "temporaries: fused kernels keep fewer intermediates alive (small; mostly a speed strategy)"
    costs = "compilation in the first step (tens of seconds; minutes for big models), reported as compile_seconds"
    # Last: it compiles the model as the other strategies left it (adapters, head wrapper).
    order = 90
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
