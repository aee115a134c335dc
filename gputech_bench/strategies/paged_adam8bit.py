"""paged-adam8bit: bitsandbytes' paged 8-bit AdamW.

The 8-bit state of strategy 3, allocated in CUDA unified memory: when the GPU runs
short, the driver pages optimizer state out to host memory instead of failing, and
back in when the step needs it. Only a CUDA device has unified memory to page.
"""

from __future__ import annotations

from ..errors import StrategyError
from .adam8bit import BITSANDBYTES, Adam8bit, load_bitsandbytes, probe_kernels
from .base import RunContext
from .facts import StateLocation, TimeFactor, modelled_by
from .registry import register


@register
class PagedAdam8bit(Adam8bit):
    """Strategy 3's optimizer and settings, with paged state."""

    key = "paged-adam8bit"
    name = "paged-adam8bit"
    saves = "optimizer state: 8-bit moments (as 3), paged to host memory by the driver when the GPU runs short"
    costs = "as 3, plus page transfers over PCIe whenever memory is tight"
    order = 46
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "assumed as 3's, not measured: page transfers under pressure are not modelled")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.PAGED
    libraries = ("bitsandbytes",)
    micro_batch_counts = ()
    # Modelled (estimator/modelled.py): traced as 3, its state counted on the host side.
    estimate = modelled_by("paged-state", "3")
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    needs_cuda = True
    requires = "CUDA (unified memory) and bitsandbytes >= 0.45 with kernels for this GPU"
    gives_up = "quantised optimizer moments (8-bit block-wise), decoupled weight decay (AdamW)"

    untraceable = "its state lives in unified memory, outside the allocator the estimate models"
    optimizer_class = "PagedAdamW8bit"

    @classmethod
    def backend_for(cls, config) -> str:
        # Paged state is bitsandbytes' alone; strategy.adam8bit_backend chooses strategy 3's
        # optimizer, and the result's optimizer_backend says bitsandbytes here whatever it is.
        return BITSANDBYTES

    def device_refusal(self, ctx: RunContext) -> None:
        if ctx.tracing:
            # The estimate models it (as 3, its state on the host side): it needs bitsandbytes'
            # optimizer there, not unified memory.
            load_bitsandbytes()
            return
        if ctx.device.type != "cuda":
            raise StrategyError(
                "paged-adam8bit needs CUDA: bitsandbytes pages optimizer state through CUDA unified memory; "
                "run it on a GPU, or use 3 (adam8bit) on this machine"
            )
        probe_kernels(load_bitsandbytes(), ctx.device)
