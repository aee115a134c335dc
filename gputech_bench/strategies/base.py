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
* ``wrap_loss``       how the training loss is computed from the model's final hidden
                      states and the targets (sparse-head: at the labelled rows only).
                      Composable.
* ``wrap_predict``    how evaluation predicts from them (sparse-head: the argmax a few
                      hundred rows at a time); evaluation's loss is the loss hooks'.
                      Composable.
* ``wrap_optimizer``  when the built optimizer steps (optimizer-in-backward: each
                      parameter's update inside backward). Composable: it wraps whatever
                      optimizer ``build_optimizer`` chose, so 3's 8-bit Adam keeps its state.

"Exclusive" hooks have one owner per cell; two strategies that claim the same one
cannot be combined and the cell is refused before anything runs. A strategy may own one
only while a setting is on (``hooks_owned_by_setting``): then the clash is refused at the
launch stage, naming the setting that causes it.

The loss and predict hooks compose, as torchtune's and litgpt's loss objects do: once a
strategy of the cell overrides either, the model runs only to its final hidden states
(``hidden_states.HiddenStateModel``), which become ``TokenRows``: one row per position,
beside the token it should predict (a causal LM's already shifted, as transformers
shifts its labels), with the model's own LM head to apply. The innermost loss is the
cross-entropy the model's own forward computes (``defaults``); each strategy's hook
wraps the hooks of the strategies after it in ``order``, so the earliest sees the rows
first. A hook must call ``inner`` (on fewer rows, on chunks, or to change its result),
never stand in for it, so that every strategy's hook takes part. A loss hook changes how
the mean cross-entropy is computed, not its value: evaluation reports the same hooks'
loss (under no_grad, the innermost in fp32) as the objective's. The model is wrapped
where the first such strategy stands in ``order``: strategies before it change the
model inside the wrapper, strategies after it (compile) act on the wrapper. With no
strategy using them, training calls the model's own forward and loss, as the baseline
always did.

Refusals are declared or checked at the earliest stage that can judge them, and each
check is named by its stage:

* ``combination_refusal(cell)`` (registry): two strategies that own one exclusive hook,
  or that name each other in ``incompatible``. Returns the reason, or None.
* ``Strategy.config_refusal(config)``: the resolved config rules the strategy out.
  Cheap and import-free. Raises StrategyError.
* ``launch_refusal(cell, config, cuda)`` (plan): the two above, plus ``needs_cuda`` and two
  owners of one hook where a setting makes one its owner (``hooks_owned_by_setting``), in
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
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

from ..data.masking import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import BenchConfig
    from .facts import Estimate, MicroBatchTimeFactor, StateLocation, TimeFactor


#: Hooks that only one strategy of a cell may own.
EXCLUSIVE_HOOKS = ("placement", "build_optimizer", "split_batch", "precision")
#: Hooks every strategy of a cell may use: each wraps the next in ``order``.
HIDDEN_STATE_HOOKS = ("wrap_loss", "wrap_predict")


@dataclass(frozen=True)
class RunContext:
    """What a hook may look at: the resolved config and where compute happens."""

    config: "BenchConfig"
    device: "torch.device"
    #: The top-level modules of a head that loading initialised afresh (``LoadReport.
    #: new_head_modules``, e.g. ``("cls",)``): it has learnt nothing, so LoRA and qlora train
    #: it in full (peft's ``modules_to_save``). Required: a context that forgot the load
    #: report would silently freeze a random head. A memory estimate reads no weights: ().
    new_head_modules: tuple[str, ...]
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


@dataclass(frozen=True)
class TokenRows:
    """What the loss and predict hooks work on: the model's final hidden states (the base
    model's output, before its LM head), one row per position, beside the token each row
    should predict. A causal LM's rows are already shifted: the row of position t holds the
    token at t+1, exactly as transformers shifts its labels, and the last position has no
    row. Rows without a target hold IGNORE_INDEX."""

    hidden: "torch.Tensor"  # (rows, hidden size)
    targets: "torch.Tensor"  # (rows,) token ids
    #: The model's own head: hidden rows -> vocabulary scores, as its forward applies it.
    head: Callable[["torch.Tensor"], "torch.Tensor"]

    def select(self, rows: "torch.Tensor") -> TokenRows:
        """The rows at the indices ``rows``, in that order."""
        return TokenRows(self.hidden.index_select(0, rows), self.targets.index_select(0, rows), self.head)

    def labelled(self) -> TokenRows:
        """Only the rows that carry a target, in row order."""
        return self.select((self.targets != IGNORE_INDEX).nonzero().squeeze(1))

    def chunks(self, rows: int) -> list[TokenRows]:
        """Consecutive slices of at most ``rows`` rows (views: nothing is copied)."""
        return [
            TokenRows(self.hidden[start:start + rows], self.targets[start:start + rows], self.head)
            for start in range(0, self.hidden.shape[0], rows)
        ]


def setting_is_on(config: "BenchConfig", key: str) -> bool:
    """Whether the boolean setting ``key`` ("section.field") is on in ``config``."""
    section, field = key.split(".")
    return bool(getattr(getattr(config, section), field))


#: Rows -> the mean cross-entropy over those that carry a target: what a loss hook wraps.
TokenLoss = Callable[[TokenRows], "torch.Tensor"]
#: Rows -> the argmax token id of each row, shaped (rows,): what a predict hook wraps.
TokenPredict = Callable[[TokenRows], "torch.Tensor"]


@dataclass(frozen=True)
class Predictions:
    """One evaluation batch's predictions: the argmax token at each position that has a
    target (shaped like ``input_ids`` for a masked-LM; like ``input_ids[:, :-1]`` for a
    causal LM, the next token) and the objective's loss, the mean over labelled positions."""

    predicted: "torch.Tensor"
    loss: "torch.Tensor"


@dataclass(frozen=True)
class Predictor:
    """How evaluation predicts a batch, and the model it puts in eval mode meanwhile."""

    model: "nn.Module"
    predict: Callable[[dict[str, "torch.Tensor"]], Predictions]


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
    #: Exclusive hooks this strategy overrides but owns only while a boolean setting is on,
    #: by hook: the setting's key (bf16-weights builds its own optimizer only for
    #: ``strategy.stochastic_rounding``). The combination stage judges a cell without them;
    #: ``plan.launch_refusal`` refuses a clash under the config, naming the setting.
    hooks_owned_by_setting: ClassVar[dict[str, str]] = {}

    #: False when the strategy updates weights before every gradient exists (optimizer-in-
    #: backward), so the global norm that clipping needs never exists: the loop then skips
    #: clipping, and the result's ``gradient_clipping`` fact says so.
    allows_gradient_clipping: ClassVar[bool] = True

    #: True when its placement shards the weights over the ranks itself (FSDP): a run with
    #: several ranks is not wrapped in DistributedDataParallel, and the estimate traces it
    #: inside a fake process group on a device FSDP2 can mesh.
    shards: ClassVar[bool] = False
    #: Why it cannot run on more than one rank ("" = it can): its cells are refused on several
    #: ranks, and fit leaves them out there.
    one_rank_only: ClassVar[str] = ""

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
    moves_activations_to_host: ClassVar[bool]

    @classmethod
    def libraries_for(cls, config: "BenchConfig") -> tuple[str, ...]:
        """The libraries a run of it under ``config`` loads (the warm-up loads them): its
        ``libraries``, unless a setting chooses among them (strategy 3's backend)."""
        return cls.libraries

    @classmethod
    def trace_refusal(cls, device_type: str) -> str | None:
        """Estimate stage: why the estimate cannot trace this strategy on fake tensors of
        ``device_type``, or None when it can; ``fit`` searches only traceable strategies."""
        return cls.untraceable or None

    def claims(self) -> set[str]:
        """The exclusive hooks this strategy owns whatever the config: those it overrides,
        less the ones it owns only while a setting is on (``hooks_owned_by_setting``)."""
        overridden = {hook for hook in EXCLUSIVE_HOOKS if getattr(type(self), hook) is not getattr(Strategy, hook)}
        return overridden - set(self.hooks_owned_by_setting)

    def claims_under(self, config: "BenchConfig") -> set[str]:
        """The exclusive hooks this strategy owns under ``config``: ``claims()`` plus each hook
        of ``hooks_owned_by_setting`` whose setting is on."""
        return self.claims() | {
            hook for hook, key in self.hooks_owned_by_setting.items() if setting_is_on(config, key)
        }

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

    def table_notes(self, ctx: RunContext) -> list[str]:
        """Lines the result's notes (under every table) carry for this strategy: what it changed
        that a reader of the figures must know (an optimizer replaced, rounding that loses updates)."""
        return []

    def wrap_loss(self, inner: TokenLoss, ctx: RunContext) -> TokenLoss:
        """The training loss from the final hidden states: return a function of ``TokenRows``
        that calls ``inner`` (the later strategies' hooks, then the model's cross-entropy) and
        returns the mean cross-entropy over the rows that carry a target. Called twice per
        plan (training's composition and evaluation's), so it keeps no state of its own."""
        return inner

    def wrap_predict(self, inner: TokenPredict, ctx: RunContext) -> TokenPredict:
        """Evaluation's predictions from the final hidden states: return a function of
        ``TokenRows`` that calls ``inner`` and returns the argmax token id of every row.
        (Evaluation's loss is the loss hooks' own, under no_grad, with the innermost
        cross-entropy in fp32.)"""
        return inner

    def wrap_optimizer(self, optimizer: "torch.optim.Optimizer", ctx: RunContext) -> "torch.optim.Optimizer":
        """The optimizer the loop steps: ``optimizer`` (the cell's, from ``build_optimizer`` or
        AdamW), or an object that drives it otherwise and exposes its ``param_groups`` and
        ``state``, so the LR schedule and the memory tracker reach the real one. Applied in
        ``order``, after the result's facts name the optimizer that was built."""
        return optimizer

    def uses_hidden_states(self) -> bool:
        """Whether this strategy overrides a loss or predict hook (``HIDDEN_STATE_HOOKS``)."""
        return any(getattr(type(self), hook) is not getattr(Strategy, hook) for hook in HIDDEN_STATE_HOOKS)

