"""bf16-weights: "pure bf16" - the weights, their gradients and the optimizer state in bf16.

How most LLM fine-tunes run today (torchtune's ``dtype: bf16``, litgpt's ``bf16-true``):
the model itself is cast to bf16, so every matmul and every saved activation is bf16, each
gradient is bf16 (autograd gives a gradient its parameter's dtype) and AdamW's moments
are bf16 (torch creates them like their parameter). There is no fp32 copy anywhere, unlike
amp (fp32 weights on the device) and strategy 4 (an fp32 master on the host).

What it costs is the rounding of each update: a bf16 weight has 8 significant bits, so an
update smaller than half the gap to its neighbour rounds back to the weight it started
from, and late-training updates (small learning rate, small moments) can vanish. With
``strategy.stochastic_rounding`` the strategy builds its own AdamW, which computes each
update in fp32 and rounds the new weight up or down with probabilities that make it exact
on average (as torchao's ``bf16_stochastic_round`` does). That optimizer is this
strategy's only while the setting is on (``hooks_owned_by_setting``), so without it the
strategy combines with another optimizer (3's 8-bit Adam steps bf16 weights as they are).

Floating-point buffers stay fp32, as strategy 4 keeps them: they are constants, not
weights (Llama's rotary inverse frequencies lose position precision in bf16, and
transformers keeps them fp32 in a half model too). A causal LM's loss stays fp32
(transformers upcasts its logits); a masked-LM's is computed in bf16, as BertForMaskedLM
computes it in its scores' dtype: the result's facts say which.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import StrategyError
from .architecture import is_causal_lm
from .base import RunContext, Strategy
from .facts import StateLocation, TRACED, TimeFactor
from .mixed_precision import fp32_buffers
from .registry import register

#: Elements of one tensor updated at a time by the stochastic-rounding AdamW: its fp32
#: temporaries (the weight, the gradient, both moments) stay a few MiB each, however large
#: the tensor (the seed's embedding has 115 million).
SR_CHUNK_ELEMENTS = 1 << 20


def round_to_bf16_stochastically(values: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding away from zero with probability (the 16 bits bf16 drops) / 2^16,
    so that the expected result is the fp32 value. Adding 16 random bits to the bit pattern
    carries into bf16's last bit exactly that often; the low half is then cut off. Non-finite
    values (a diverged step) round to nearest, so that a carry never turns NaN into a number."""
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000
    return torch.where(torch.isfinite(values), rounded, values).to(torch.bfloat16)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (torch's arithmetic: decoupled weight decay, bias-corrected moments) computed in
    fp32 per chunk of each tensor; the moments are stored in the parameter's dtype, and a bf16
    weight is written back by ``round_to_bf16_stochastically`` (others by plain copy)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"]
                scale = {
                    "step_size": group["lr"] / (1 - beta1 ** step),
                    "root_correction": (1 - beta2 ** step) ** 0.5,
                    "decay": 1 - group["lr"] * group["weight_decay"],
                }
                flat = [t.view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, param.numel(), SR_CHUNK_ELEMENTS):
                    weight, grad, exp_avg, exp_avg_sq = (t[start:start + SR_CHUNK_ELEMENTS] for t in flat)
                    self._update(weight, grad, exp_avg, exp_avg_sq, beta1, beta2, group["eps"], scale)
        return loss

    @staticmethod
    def _update(param, grad, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float, scale: dict) -> None:
        # Out of place: on an fp32 tensor .float() is the tensor itself, not a copy.
        grad32 = grad.float()
        mean = exp_avg.float().lerp(grad32, 1 - beta1)
        square = exp_avg_sq.float().mul(beta2).addcmul_(grad32, grad32, value=1 - beta2)
        exp_avg.copy_(mean)
        exp_avg_sq.copy_(square)
        denominator = square.sqrt_().div_(scale["root_correction"]).add_(eps)
        weight = param.float().mul(scale["decay"]).addcdiv_(mean, denominator, value=-scale["step_size"])
        param.copy_(round_to_bf16_stochastically(weight) if param.dtype == torch.bfloat16 else weight)


def cast_to_bf16(model: nn.Module) -> list[str]:
    """Cast ``model``'s floating-point parameters to bf16 in place (tied weights stay tied), its
    fp32 buffers kept fp32. Returns the names of the buffers kept."""
    kept = fp32_buffers(model)
    names = {id(module): name for name, module in model.named_modules()}
    model.to(dtype=torch.bfloat16)
    for module, name, buffer in kept:
        module._buffers[name] = buffer
    return sorted({f"{names[id(module)]}.{name}".lstrip(".") for module, name, _ in kept})


@register
class Bf16Weights(Strategy):
    key = "bf16-weights"
    name = "bf16-weights"
    saves = "weights, gradients and optimizer state: bf16, half their fp32 bytes (and every activation is bf16)"
    costs = ("no fp32 copy: each update rounds to bf16 (stochastically with strategy.stochastic_rounding); "
             "a GPU without bf16 (before Ampere) cannot run it")
    # After LoRA (50) and qlora, so that adapters are cast too; before the loss hooks' users.
    order = 53
    # Facts (facts.py): what estimate, fit, the runner, the warm-up and the docs know of it.
    time_factor = TimeFactor(0.6, "assumed equal to amp's, not measured: bf16 matmuls on tensor cores without "
                             "autocast's per-op casts, and a half-sized optimizer step; a --from run replaces it")
    changes_activations_only = False
    trains_adapters = False
    state_location = StateLocation.DEVICE
    libraries = ()
    micro_batch_counts = ()
    estimate = TRACED
    in_causal_lm_matrix = False
    moves_activations_to_host = False
    requires = "bf16 on the compute device (CUDA compute capability 8.0 or later, or the CPU)"
    gives_up = ("bf16 weights with no fp32 copy: updates under half a bf16 step of a weight are lost to rounding "
                "(unless strategy.stochastic_rounding), and a masked-LM's loss is computed in bf16")
    hooks_owned_by_setting = {"build_optimizer": "strategy.stochastic_rounding"}
    incompatible = {
        "4": "strategy 4 keeps an fp32 master copy on the host and steps it there; pure bf16 keeps no fp32 copy "
             "at all: they are two answers to one question",
        "amp": "autocast to bf16 is redundant: the weights already are bf16, so every matmul already runs in bf16",
        "amp-fp16": "autocast to fp16 over bf16 weights would mix two half formats, and its GradScaler would "
                    "unscale bf16 gradients, which need no loss scaling",
        "qlora": "qlora's frozen base is already 4-bit and its compute dtype is set when it quantises; "
                 "amp+qlora gives its bf16 compute",
        "fsdp-offload": "not tried together: fsdp-offload's host-side weights and its modelled estimate "
                        "assume fp32 weights",
    }

    def device_refusal(self, ctx: RunContext) -> None:
        if ctx.device.type == "cuda" and not ctx.tracing and not torch.cuda.is_bf16_supported():
            raise StrategyError(
                f"{torch.cuda.get_device_name(ctx.device)} has no bf16 arithmetic (compute capability < 8.0): "
                "use amp-fp16 or strategy 4 instead of bf16-weights"
            )

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.kept_fp32 = cast_to_bf16(model)
        return model

    def build_optimizer(self, params: Iterable[torch.Tensor], ctx: RunContext) -> torch.optim.Optimizer:
        # Called only while strategy.stochastic_rounding is on (hooks_owned_by_setting).
        train = ctx.config.train
        return StochasticRoundingAdamW(params, lr=train.lr, eps=train.adam_eps, weight_decay=train.weight_decay)

    def table_notes(self, ctx: RunContext) -> list[str]:
        if ctx.config.strategy.stochastic_rounding:
            return ["the optimizer is bf16-weights' own AdamW (fp32 arithmetic, each new bf16 weight "
                    "rounded stochastically), not torch's; weights, gradients and moments in bf16, no fp32 copy"]
        return ["weights, gradients and optimizer state in bf16 with no fp32 copy; updates under half "
                "a bf16 step of a weight are lost to rounding (strategy.stochastic_rounding=true keeps them on average)"]

    def describe(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        rounding = (
            "stochastic (bf16-weights' AdamW: fp32 arithmetic, each new weight rounded up or down, exact on average)"
            if ctx.config.strategy.stochastic_rounding
            else "round to nearest: updates under half a bf16 step of a weight are lost"
        )
        return {
            "weights_dtype": "bfloat16",
            "gradients_dtype": "bfloat16",
            "optimizer_state_dtype": "bfloat16 (AdamW's moments), or the optimizer's own format (8-bit, 4-bit)",
            "weight_update_rounding": rounding,
            "fp32_buffers_kept": getattr(self, "kept_fp32", []),
            "loss_dtype": "float32 (transformers upcasts a causal LM's logits)" if is_causal_lm(model)
            else "bfloat16 (a masked-LM's loss in its scores' dtype, as BertForMaskedLM computes it)",
        }
