"""Strategy 3: 8-bit Adam (block-wise quantised optimizer state).

``strategy.adam8bit_backend`` chooses whose: bitsandbytes' Adam8bit (the seed's, the default)
or torchao's AdamW8bit, so that the two can be compared on one card. Both apply weight decay
decoupled from the gradient (bitsandbytes' "adam" kernel decays the weights as AdamW does),
both quantise in blocks (256 values) and both keep a tensor under 4,096 values in fp32.
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Iterable

import torch

from ..errors import StrategyError, first_line
from .base import RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .registry import register
from .torchao_optim import TRACKED_STEP_NOTE, load_torchao_optim, low_bit_adamw, probe_step, torchao_version

#: strategy.adam8bit_backend's choices.
BITSANDBYTES, TORCHAO = "bitsandbytes", "torchao"
#: The fix a refusal of torchao's backend offers.
USE_BITSANDBYTES = f"--set strategy.adam8bit_backend={BITSANDBYTES}"


def load_bitsandbytes(needed_by: str = "strategy 3"):
    """Import bitsandbytes, turning any failure into one actionable line."""
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as error:  # broken installs raise all sorts of things
        raise StrategyError(
            f"bitsandbytes could not be imported ({first_line(error)}): pip install 'bitsandbytes>=0.45' "
            f"for this torch and CUDA, or leave {needed_by} out"
        ) from None


def probe_kernels(bnb, device: torch.device) -> None:
    """One 8-bit step on a throw-away tensor: a bitsandbytes build without kernels for this
    GPU or CUDA version fails here, in one line, instead of mid-training."""
    try:
        # 4096 elements: the smallest tensor bitsandbytes keeps in 8-bit state.
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.Adam8bit([probe], lr=1e-3).step()
    except Exception as error:
        raise StrategyError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot step an 8-bit optimizer on {device} "
            f"({first_line(error)}): install a bitsandbytes build for this GPU and CUDA version, or leave strategy 3 out"
        ) from None


@register
class Adam8bit(Strategy):
    key = "3"
    name = "adam8bit"
    saves = "optimizer state: two uint8 moments instead of two fp32 (about 2 of 8 bytes per parameter)"
    costs = "quantisation work in each step; under nvidia-smi the saving can hide in the allocator's reserve"
    order = 30
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(1.0, "reasoned: the optimizer step is small next to forward and backward")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    # Either backend's library: ``libraries_for`` names the one a config chooses.
    libraries: ClassVar[tuple[str, ...]] = (BITSANDBYTES, TORCHAO)
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    gives_up = "quantised optimizer moments (8-bit block-wise)"
    requires = ("bitsandbytes >= 0.45 (CPU kernels included; on CUDA, a build with kernels for this GPU), "
                "or with strategy.adam8bit_backend=torchao, torchao 0.18 and torch.compile")

    @classmethod
    def backend_for(cls, config) -> str:
        """Whose 8-bit optimizer steps: strategy.adam8bit_backend."""
        return config.strategy.adam8bit_backend

    @classmethod
    def libraries_for(cls, config) -> tuple[str, ...]:
        return (cls.backend_for(config),)

    def _steps_torchao(self, ctx: RunContext) -> bool:
        """Whether torchao's AdamW8bit steps. Not in the estimate's trace: torchao's compiled
        update needs real values, so the trace builds bitsandbytes' Adam8bit, whose state has
        the same bytes (a uint8 code a value, one fp32 scale per 256, a 256-value fp32 code
        book, fp32 under 4,096 values), and the prediction's facts say so (``describe``)."""
        return self.backend_for(ctx.config) == TORCHAO and not ctx.tracing

    def device_refusal(self, ctx: RunContext) -> None:
        if self._steps_torchao(ctx):
            load_torchao_optim(USE_BITSANDBYTES)
            probe_step(8, ctx.device, USE_BITSANDBYTES)
            return
        bnb = load_bitsandbytes()
        if not ctx.tracing:
            probe_kernels(bnb, ctx.device)

    #: The bitsandbytes optimizer (in ``bitsandbytes.optim``) this strategy builds.
    optimizer_class = "Adam8bit"

    def build_optimizer(self, params: Iterable[torch.Tensor], ctx: RunContext) -> torch.optim.Optimizer:
        if self._steps_torchao(ctx):
            return low_bit_adamw(8, params, ctx, betas=ctx.config.strategy.adam8bit_betas, otherwise=USE_BITSANDBYTES)
        train = ctx.config.train
        return getattr(load_bitsandbytes().optim, self.optimizer_class)(
            params,
            lr=train.lr,
            betas=ctx.config.strategy.adam8bit_betas,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
        )

    def describe(self, model, ctx: RunContext) -> dict:
        if self.backend_for(ctx.config) == TORCHAO and ctx.tracing:
            return {
                "optimizer_backend": TORCHAO,
                "traced_as": f"bitsandbytes.optim.{self.optimizer_class}: torchao's compiled update needs real values; "
                             "its 8-bit state has the same bytes (uint8 codes, one fp32 scale per 256, a 256-value code book)",
            }
        if self._steps_torchao(ctx):
            return {
                "optimizer_backend": TORCHAO,
                "betas": list(ctx.config.strategy.adam8bit_betas),
                "torchao_version": torchao_version(),
                "memory_tracked_step": TRACKED_STEP_NOTE,
            }
        bnb = load_bitsandbytes()
        return {
            "optimizer_backend": BITSANDBYTES,
            "optimizer": f"bitsandbytes.optim.{self.optimizer_class}",
            "betas": list(ctx.config.strategy.adam8bit_betas),
            "bitsandbytes_version": getattr(bnb, "__version__", "unknown"),
        }
