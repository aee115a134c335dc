"""The strategy protocol: a few named hooks instead of an if-chain in the training loop.

A strategy acts on a run through these hooks:

* ``prepare_model``   change the fp32 model (LoRA adapters, activation checkpointing);
                      every strategy may use it, in ``order``.
* ``placement``       decide where the trained weights live and how an optimizer step
                      reaches them (the fp32 master copy on the host). Exclusive.
* ``build_optimizer`` choose the optimizer class (8-bit Adam). Exclusive.
* ``split_batch``     turn one batch into micro-batches with their loss weights
                      (gradient accumulation). Exclusive.
* ``precision``       how forward runs and how the loss reaches the gradients
                      (autocast, loss scaling). Exclusive.

"Exclusive" hooks have one owner per cell; two strategies that claim the same one
cannot be combined and the cell is refused before anything runs.

Refusals are declared or checked at the earliest stage that can judge them, and each
check is named by its stage:

* ``combination_refusal(cell)`` (registry): two strategies that own one exclusive hook,
  or that name each other in ``incompatible``. Returns the reason, or None.
* ``Strategy.config_refusal(config)``: the resolved config rules the strategy out.
  Cheap and import-free. Raises StrategyError.
* ``launch_refusal(cell, config, cuda)`` (plan): the two above, plus ``needs_cuda``, in
  the runner before any process starts (also ``fit``, for each setup). Raises.
* ``Strategy.trace_refusal(device_type)``: the memory estimate cannot follow the
  strategy on fake tensors. Returns the reason, or None.
* ``Strategy.device_refusal(ctx)``: this device or installation cannot run it
  (bitsandbytes' kernels, torch.distributed's backends). Raises StrategyError.
* ``device_refusal(cell, ctx)`` (plan): all of the above for one cell, where it is about
  to run: in the worker, or in the estimate's trace. Raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import BenchConfig
    from .facts import Estimate, MicroBatchTimeFactor, StateLocation, TimeFactor


#: Hooks that only one strategy of a cell may own.
EXCLUSIVE_HOOKS = ("placement", "build_optimizer", "split_batch", "precision")


@dataclass(frozen=True)
class RunContext:
    """What a hook may look at: the resolved config and where compute happens."""

    config: "BenchConfig"
    device: "torch.device"
    #: True while the memory estimate traces a step on fake tensors: no kernel runs,
    #: so checks that run one (bitsandbytes' probe) have nothing to test.
    tracing: bool = False
    #: This process's rank and the number of ranks (``--nproc-per-node``); each rank
    #: trains on its share of every batch.
    rank: int = 0
    world_size: int = 1

    @property
    def rank_batch_size(self) -> int:
        """Rows of each training batch this rank computes."""
        return self.config.train.batch_size // self.world_size


@dataclass(frozen=True)
class MicroBatch:
    """A slice of the batch and the factor its loss is multiplied by before backward."""

    inputs: dict[str, "torch.Tensor"]
    loss_weight: float


class Placement:
    """Where trainable weights live and what happens around ``optimizer.step()``.

    The default keeps the weights in the model itself, on the compute device.
    """

    #: The module that runs forward and backward.
    compute_model: "nn.Module"
    #: Whether gradient clipping (train.max_grad_norm) applies to this placement.
    clips_gradients: bool = True
    #: dtype the compute copy runs in, for the result.
    compute_dtype: "torch.dtype"
    #: True when the placement splits the weights over the ranks itself (FSDP); other
    #: placements are wrapped in DistributedDataParallel when there are several ranks.
    shards: bool = False

    def optimizer_parameters(self) -> list["torch.Tensor"]:
        raise NotImplementedError

    def before_step(self) -> None:
        """Make ``optimizer_parameters()`` carry the gradients of the last backward."""

    def after_step(self) -> None:
        """Make the compute model see the updated weights."""

    def tracked_objects(self) -> list[Any]:
        """Modules and tensors a memory tracker must know about besides the compute model."""
        return []


class Precision:
    """How the forward pass runs and how the loss becomes gradients.

    The default is the seed's: whatever dtype the weights have, no autocast and no
    loss scaling.
    """

    def autocast(self) -> contextlib.AbstractContextManager:
        """Entered around every forward pass, training and evaluation alike."""
        return contextlib.nullcontext()

    def backward(self, loss: "torch.Tensor") -> None:
        loss.backward()

    def unscale(self, optimizer: "torch.optim.Optimizer") -> None:
        """Bring the gradients to their true scale, before clipping reads them."""

    def step(self, optimizer: "torch.optim.Optimizer") -> None:
        optimizer.step()


class Strategy:
    """One memory-saving technique. Subclasses override the hooks they use."""

    #: Seed number ("1".."4") or a short name; what users type.
    key: ClassVar[str]
    #: Long name, also accepted on the command line.
    name: ClassVar[str]
    #: One line each, shown by ``gputech-bench strategies``.
    saves: ClassVar[str]
    costs: ClassVar[str]
    #: Position in a canonical cell name and in the order ``prepare_model`` runs.
    order: ClassVar[int]
    #: What it needs to run, shown by ``gputech-bench strategies`` ("" = nothing special).
    requires: ClassVar[str] = ""
    #: What training gives up with it ("" = the same training), shown by ``fit``.
    gives_up: ClassVar[str] = ""
    #: Runs only on a CUDA device; a run elsewhere refuses the cell before it starts.
    needs_cuda: ClassVar[bool] = False
    #: Strategies (by key) this one cannot run with, and why; ``combination_refusal`` refuses
    #: the pair with this reason, as it refuses two owners of one hook.
    incompatible: ClassVar[dict[str, str]] = {}

    #: Why the memory estimate cannot follow this strategy on fake tensors ("" = it can).
    untraceable: ClassVar[str] = ""
    #: The model recompiles when a batch of a new shape arrives (torch.compile): a step on
    #: an epoch's short last batch is then compilation, and is kept out of the timing.
    recompiles_on_new_shapes: ClassVar[bool] = False

    # Facts every strategy declares (facts.py says what each means). No defaults on purpose:
    # registry.register refuses a class that leaves one out, naming it.
    time_factor: ClassVar["TimeFactor | MicroBatchTimeFactor"]
    changes_activations_only: ClassVar[bool]
    trains_adapters: ClassVar[bool]
    state_location: ClassVar["StateLocation"]
    libraries: ClassVar[tuple[str, ...]]
    micro_batch_counts: ClassVar[tuple[int, ...]]
    estimate: ClassVar["Estimate"]
    in_causal_lm_matrix: ClassVar[bool]

    @classmethod
    def trace_refusal(cls, device_type: str) -> str | None:
        """Estimate stage: why the estimate cannot trace this strategy on fake tensors of
        ``device_type``, or None when it can; ``fit`` searches only traceable strategies."""
        return cls.untraceable or None

    def claims(self) -> set[str]:
        """The exclusive hooks this strategy overrides."""
        return {hook for hook in EXCLUSIVE_HOOKS if getattr(type(self), hook) is not getattr(Strategy, hook)}

    def config_refusal(self, config: "BenchConfig") -> None:
        """Config stage: raise StrategyError when the config rules this strategy out. Cheap and
        import-free, so the runner can refuse a cell before starting any process."""

    def device_refusal(self, ctx: RunContext) -> None:
        """Device stage: raise StrategyError when this strategy cannot run on this device or
        installation. Runs where the cell is about to run (the worker, or the estimate's trace)."""

    def prepare_model(self, model: "nn.Module", ctx: RunContext) -> "nn.Module":
        return model

    def placement(self, model: "nn.Module", ctx: RunContext) -> Placement:
        raise NotImplementedError

    def build_optimizer(self, params: Iterable["torch.Tensor"], ctx: RunContext) -> "torch.optim.Optimizer":
        raise NotImplementedError

    def split_batch(self, batch: dict[str, "torch.Tensor"], ctx: RunContext) -> list[MicroBatch]:
        raise NotImplementedError

    def rows_per_forward(self, ctx: RunContext) -> int:
        """Rows of one forward pass when this strategy owns ``split_batch``; evaluation
        runs no more rows at once, so it never holds more logits than training did."""
        return ctx.rank_batch_size

    def precision(self, ctx: RunContext) -> Precision:
        raise NotImplementedError

    def describe(self, model: "nn.Module", ctx: RunContext) -> dict[str, Any]:
        """Facts about what the strategy did, recorded in the result."""
        return {}

