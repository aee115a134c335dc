"""torchao's low-bit AdamW (``torchao.optim``): imported in one line or refused in one,
probed on the device, and its state counted byte by byte.

torchao keeps each Adam moment of a large tensor as a tensor subclass (``OptimState4bit``,
``OptimState8bit``) that holds packed codes, one fp32 scale per block and a small code book;
a tensor under 4,096 values, or one whose size is not a multiple of the block, keeps plain
moments in the parameter's dtype (``_AdamBase._new_buffer``, after bitsandbytes). Each
parameter's update is one ``torch.compile``d function, compiled once per shape at the first
step (a C++ compiler on CPU, Triton on CUDA).
"""

from __future__ import annotations

import functools
import importlib
import types
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import StrategyError, first_line
from .base import RunContext

#: The torchao release line the project pins (pyproject.toml): its optimizers' arguments,
#: block sizes and threshold are read from 0.18.
TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"
#: torchao quantises a moment only from this many values (``_AdamBase._new_buffer``).
QUANTISED_FROM_VALUES = 4096
#: The block sizes of torchao 0.18's AdamW4bit and AdamW8bit (their constructors' defaults).
BLOCK_SIZE = {4: 128, 8: 256}


def load_torchao_optim(otherwise: str) -> Any:
    """``torchao.optim``, or a StrategyError in one line saying what to install (or ``otherwise`` do)."""
    try:
        return importlib.import_module("torchao.optim")  # its extension warnings: gputech_bench/__init__.py
    except Exception as error:  # broken installs raise all sorts of things
        raise StrategyError(
            f"torchao could not be imported ({first_line(error)}): pip install '{TORCHAO_REQUIREMENT}' "
            f"for this torch, or {otherwise}"
        ) from None


def torchao_version() -> str:
    try:
        return str(importlib.import_module("torchao").__version__)
    except Exception:  # noqa: BLE001 - only for the record
        return "unknown"


#: What a result says about the memory-tracked step of a torchao optimizer (``eager_while_tracked``).
TRACKED_STEP_NOTE = (
    "the memory-tracked step runs torchao's update eagerly (torch.compile cannot run under MemTracker's dispatch "
    "mode): its temporaries are the eager update's, more than the compiled kernel's; the state bytes are the same"
)


def eager_while_tracked(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Let ``optimizer.step`` run under a TorchDispatchMode (MemTracker, on the memory-tracked
    step): torchao compiles its update with ``fullgraph=True``, which refuses such a mode, so
    under one the update runs eagerly (``torch.compiler.set_stance("force_eager")``): the same
    arithmetic on the same state tensors, op by op. Every other step stays compiled."""
    compiled_step = type(optimizer).step

    @functools.wraps(compiled_step)
    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if _get_current_dispatch_mode() is None:
            return compiled_step(self, *args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return compiled_step(self, *args, **kwargs)

    # A bound method of the instance, as torch's LR schedulers expect (they wrap it in turn):
    # the optimizer stays torchao's own class.
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
    return optimizer


def low_bit_adamw(bits: int, params: Iterable[torch.Tensor], ctx: RunContext, betas: tuple[float, float],
                  otherwise: str) -> torch.optim.Optimizer:
    """torchao's AdamW4bit or AdamW8bit over ``params``, with the run's learning rate, eps and
    weight decay (decoupled, as the baseline's AdamW and bitsandbytes' Adam8bit apply it)."""
    optim = load_torchao_optim(otherwise)
    train = ctx.config.train
    optimizer_class = getattr(optim, f"AdamW{bits}bit")
    return eager_while_tracked(optimizer_class(params, lr=train.lr, betas=betas, eps=train.adam_eps,
                                               weight_decay=train.weight_decay, block_size=BLOCK_SIZE[bits]))


def probe_step(bits: int, device: torch.device, otherwise: str) -> None:
    """One step of the low-bit AdamW on a throw-away tensor large enough to be quantised: a
    missing compiler (torch.compile needs a C++ one on CPU, Triton on CUDA) or a torchao build
    that does not match this torch fails here, in one line, instead of mid-training."""
    optim = load_torchao_optim(otherwise)
    try:
        probe = torch.nn.Parameter(torch.zeros(QUANTISED_FROM_VALUES, device=device))
        probe.grad = torch.ones_like(probe)
        getattr(optim, f"AdamW{bits}bit")([probe], lr=1e-3, block_size=BLOCK_SIZE[bits]).step()
    except Exception as error:
        raise StrategyError(
            f"torchao {torchao_version()} cannot step its {bits}-bit AdamW on {device} ({first_line(error)}): "
            f"torch.compile needs a C++ compiler on CPU and Triton on CUDA; install them, or '{TORCHAO_REQUIREMENT}' "
            f"for this torch, or {otherwise}"
        ) from None


# --------------------------------------------------------------------------- state bytes


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a state tensor holds: a torchao subclass's inner tensors (codes, scales, code
    book), which its outer wrapper (an fp32-looking shape without storage) does not show."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def code_book_values(bits: int) -> int:
    """Values (fp32) in the code book each quantised moment carries: one per code."""
    return 2 ** bits


def moment_bytes(numel: int, element_size: int, bits: int) -> int:
    """Bytes of one Adam moment of a tensor of ``numel`` values, as torchao 0.18 keeps it:
    quantised, ``bits`` per value packed, one fp32 scale per block and an fp32 code book; or,
    under its rule, a plain tensor in the weights' dtype (``element_size`` bytes a value).
    ``tests/test_adam4bit.py`` checks it against torchao's own state."""
    if not quantises(numel, bits):
        return numel * element_size
    return numel * bits // 8 + 4 * (numel // BLOCK_SIZE[bits]) + 4 * code_book_values(bits)


def is_quantised(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__.startswith("OptimState")


def quantises(numel: int, bits: int) -> bool:
    """Whether torchao keeps the moments of a tensor of ``numel`` values quantised (its rule)."""
    return numel >= QUANTISED_FROM_VALUES and numel % BLOCK_SIZE[bits] == 0


@dataclass(frozen=True)
class MomentSplit:
    """The trained tensors whose moments torchao quantises, and those it keeps at full width."""

    quantised_tensors: int
    quantised_values: int
    full_tensors: int
    full_values: int

    @classmethod
    def of(cls, params: Iterable[torch.Tensor], bits: int) -> "MomentSplit":
        sizes = [p.numel() for p in params if p.requires_grad]
        quantised = [n for n in sizes if quantises(n, bits)]
        full = [n for n in sizes if not quantises(n, bits)]
        return cls(len(quantised), sum(quantised), len(full), sum(full))

    def describe(self, bits: int) -> dict[str, Any]:
        return {
            f"{bits}bit_state_tensors": self.quantised_tensors,
            f"{bits}bit_state_values": self.quantised_values,
            # Said, never hidden: these moments are as large as AdamW's.
            "full_width_state_tensors": self.full_tensors,
            "full_width_state_values": self.full_values,
            "full_width_state_rule": f"tensors under {QUANTISED_FROM_VALUES:,} values or not a multiple of "
                                     f"{BLOCK_SIZE[bits]} (torchao's block) keep moments in the weights' dtype",
        }


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of the optimizer's moments: (quantised ones, full-width ones), inner tensors counted."""
    quantised = full = 0
    for state in optimizer.state.values():
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment = state.get(name)
            if isinstance(moment, torch.Tensor):
                if is_quantised(moment):
                    quantised += tensor_bytes(moment)
                else:
                    full += tensor_bytes(moment)
    return quantised, full
