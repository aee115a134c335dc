"""What every strategy declares about itself, and the check that it declared all of it.

Estimate, fit, the runner, the warm-up, the tables and the docs read these facts from the
strategy class; none of them keeps a table keyed by a strategy's key. Nothing here has a
default: ``registry.register`` refuses a class that leaves a fact out (or gives it the wrong
type), naming the fact, so a new strategy cannot be silently free in fit's cost model or
silently absent from the warm-up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import StrategyDeclarationError


# --------------------------------------------------------------------------- time


@dataclass(frozen=True)
class TimeFactor:
    """Step time relative to the baseline's, for fit's cost model (factors of a cell multiply)."""

    factor: float
    #: Where the figure comes from: measured where, or reasoned how (shown by ``strategies``).
    source: str

    def for_micro_batches(self, micro_batches: int | None) -> float:
        return self.factor

    def describe(self) -> str:
        return f"x{self.factor:.2f}"


@dataclass(frozen=True)
class MicroBatchTimeFactor:
    """A factor that grows with the number of micro-batches k: 1 + overhead (k - 1)."""

    overhead_per_extra_micro_batch: float
    source: str

    def for_micro_batches(self, micro_batches: int | None) -> float:
        # No micro-batch size chosen (the cell as named, without a setup): the cost model has
        # nothing to scale, as before this fact existed.
        if not micro_batches:
            return 1.0
        return 1 + self.overhead_per_extra_micro_batch * (micro_batches - 1)

    def describe(self) -> str:
        return f"x(1 + {self.overhead_per_extra_micro_batch:g} per micro-batch past the first)"


# --------------------------------------------------------------------------- state


class StateLocation(enum.Enum):
    """Where the trained weights' master copy and optimizer state live during a step."""

    DEVICE = "device"
    #: On the host: on a CPU run host and device are one memory, so the measured peak has
    #: nothing to compare a device prediction with.
    HOST = "host"
    #: In CUDA unified memory, paged to the host by the driver under pressure.
    PAGED = "paged"


# --------------------------------------------------------------------------- estimate


class EstimateKind(enum.Enum):
    TRACED = "traced"
    MODELLED = "modelled"
    NOT_ESTIMATED = "not estimated"


@dataclass(frozen=True)
class Estimate:
    """How the memory estimate handles a strategy.

    ``TRACED``: one step on fake tensors (where ``trace_refusal`` allows it on the device).
    ``MODELLED``: the trace refuses it (``untraceable``), and the estimator's modeller of
    that name traces the cell with ``traced_in_its_place`` (a strategy key) instead, or
    without the strategy when None, then substitutes what the strategy changes.
    ``NOT_ESTIMATED``: the trace refuses it and nothing models it; fit leaves it out.
    """

    kind: EstimateKind
    modeller: str | None
    traced_in_its_place: str | None

    def describe(self) -> str:
        if self.kind is EstimateKind.MODELLED:
            return f"modelled ({self.modeller})"
        return self.kind.value


TRACED = Estimate(EstimateKind.TRACED, None, None)
NOT_ESTIMATED = Estimate(EstimateKind.NOT_ESTIMATED, None, None)


def modelled_by(modeller: str, traced_in_its_place: str | None) -> Estimate:
    """The estimate traces the cell with ``traced_in_its_place`` (or without the strategy)
    and the modeller named ``modeller`` (registered by ``estimator/modelled.py``) adds the rest."""
    return Estimate(EstimateKind.MODELLED, modeller, traced_in_its_place)


# --------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class Fact:
    name: str
    what: str
    #: Returns why the declared value is wrong, or None when it is right.
    check: Callable[[Any], str | None]


def _is(kind: type | tuple[type, ...], described: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        # bool is an int: a flag must not pass for a count, nor a count for a flag.
        if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            return None
        return f"expected {described}, got {value!r}"
    return check


def _time_factor(value: Any) -> str | None:
    if not isinstance(value, (TimeFactor, MicroBatchTimeFactor)):
        return f"expected a TimeFactor or MicroBatchTimeFactor, got {value!r}"
    number = value.factor if isinstance(value, TimeFactor) else value.overhead_per_extra_micro_batch
    if not isinstance(number, (int, float)) or isinstance(number, bool) or number < 0:
        return f"expected a non-negative number, got {number!r}"
    if isinstance(value, TimeFactor) and number == 0:
        return "a factor of 0 would make the strategy free of time"
    if not isinstance(value.source, str) or not value.source.strip():
        return "name its source (measured where, or reasoned how)"
    return None


def _strings(value: Any) -> str | None:
    if isinstance(value, tuple) and all(isinstance(item, str) and item for item in value):
        return None
    return f"expected a tuple of names, such as ('bitsandbytes',) or (), got {value!r}"


def _micro_batch_counts(value: Any) -> str | None:
    if isinstance(value, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in value):
        return None
    return f"expected a tuple of micro-batch counts of 2 or more, such as (2, 4) or (), got {value!r}"


def _estimate(value: Any) -> str | None:
    if not isinstance(value, Estimate):
        return f"expected TRACED, NOT_ESTIMATED or modelled_by(...), got {value!r}"
    if (value.kind is EstimateKind.MODELLED) != (value.modeller is not None):
        return "a modelled estimate names its modeller, and only a modelled one"
    return None


FACTS: tuple[Fact, ...] = (
    Fact("time_factor", "its step time relative to the baseline's in fit's cost model, and that figure's source",
         _time_factor),
    Fact("changes_activations_only", "True when it changes only how many activations are live (not their dtype, "
         "nor the weights, gradients or optimizer state): fit adds it to each regime's most frugal setup",
         _is(bool, "True or False")),
    Fact("trains_adapters", "True when it trains adapters instead of the model's own weights",
         _is(bool, "True or False")),
    Fact("state_location", "where the master weights and optimizer state live", _is(StateLocation, "a StateLocation")),
    Fact("libraries", "the libraries it needs beyond torch and transformers (the warm-up loads bitsandbytes' by it)",
         _strings),
    Fact("micro_batch_counts", "fit's search axis: the numbers of micro-batches it splits the batch into "
         "(() when it does not split the batch; non-empty when it reads strategy.micro_batch_size)",
         _micro_batch_counts),
    Fact("estimate", "how the memory estimate handles it: TRACED, modelled_by(modeller, ...) or NOT_ESTIMATED",
         _estimate),
    Fact("in_causal_lm_matrix", "True when --matrix adds it for a causal LM", _is(bool, "True or False")),
    Fact("moves_activations_to_host", "True when tensors saved for backward wait in host memory: the estimate "
         "shows them on the host side, and a CPU run (one memory) has no device peak to compare",
         _is(bool, "True or False")),
)


def _declarer(cls: type, fact: str) -> type | None:
    """The class in ``cls``'s MRO whose body declares ``fact``."""
    return next((base for base in cls.__mro__ if fact in vars(base)), None)


# ``cls`` is a Strategy subclass; typed as ``Any`` since base.py imports this module's types.
def declaration_error(cls: Any) -> str | None:
    """Why ``cls`` cannot be registered: the first fact it leaves out or declares wrongly.

    A fact counts as declared when the class itself declares it, or an abstract base does
    (one without its own ``key``, such as amp's shared ``_Autocast``). A concrete strategy's
    subclass (paged-adam8bit of adam8bit) declares every fact again: inheriting another
    strategy's facts is how an omission would hide."""
    label = f"strategy '{getattr(cls, 'key', '?')}' ({cls.__name__})"
    for fact in FACTS:
        declarer = _declarer(cls, fact.name)
        if declarer is None:
            return f"{label} does not declare {fact.name}: {fact.what}"
        if declarer is not cls and "key" in vars(declarer):
            return f"{label} does not declare {fact.name} (only {declarer.__name__} does; declare it again): {fact.what}"
        wrong = fact.check(getattr(cls, fact.name))
        if wrong:
            return f"{label} declares {fact.name} wrongly: {wrong}"
    if cls.estimate.kind is EstimateKind.TRACED and cls.untraceable:
        return f"{label} declares estimate TRACED but untraceable says why it cannot be traced: use NOT_ESTIMATED or modelled_by"
    if cls.estimate.kind is not EstimateKind.TRACED and not cls.untraceable:
        return f"{label} declares estimate {cls.estimate.describe()} but no untraceable reason: say why the trace refuses it"
    return None


def check_declared(cls: Any) -> None:
    """Raise StrategyDeclarationError naming the fact when ``cls`` leaves one out."""
    error = declaration_error(cls)
    if error:
        raise StrategyDeclarationError(error)
