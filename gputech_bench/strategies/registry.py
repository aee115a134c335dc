"""Strategy registry and cell names such as ``1+2+3`` or ``checkpointing+lora``.

Numbers and names both resolve. A cell is stored under a canonical name (strategies
sorted by their ``order``) so that ``3+1`` and ``1+3`` are the same cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import StrategyError
from .base import Strategy
from .facts import check_declared

BASELINE = "baseline"

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its key and its name.

    Refuses (StrategyDeclarationError, naming the fact) a class that leaves out one of the
    facts in ``facts.FACTS``: estimate, fit, the runner and the docs read them from the class."""
    check_declared(cls)
    for alias in (cls.key, cls.name):
        alias = alias.lower()
        if alias == BASELINE or alias in _REGISTRY and _REGISTRY[alias] is not cls:
            raise ValueError(f"strategy alias '{alias}' is already taken")
        _REGISTRY[alias] = cls
    return cls


def unregister(cls: type[Strategy]) -> None:
    """Remove a strategy (tests register temporary ones)."""
    for alias in (cls.key.lower(), cls.name.lower()):
        if _REGISTRY.get(alias) is cls:
            del _REGISTRY[alias]


def registered() -> list[type[Strategy]]:
    """Every strategy once, in canonical order."""
    unique = {cls for cls in _REGISTRY.values()}
    return sorted(unique, key=lambda cls: cls.order)


def _known() -> str:
    return ", ".join(f"{cls.key} ({cls.name})" if cls.key != cls.name else cls.key for cls in registered())


def lookup(token: str) -> type[Strategy]:
    cls = _REGISTRY.get(token.strip().lower())
    if cls is None:
        raise StrategyError(f"unknown strategy '{token}': choose from {_known()}, or 'baseline'")
    return cls


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: a set of strategies applied together."""

    strategies: tuple[type[Strategy], ...]

    @property
    def name(self) -> str:
        return "+".join(cls.key for cls in self.strategies) or BASELINE

    @property
    def long_name(self) -> str:
        return "+".join(cls.name for cls in self.strategies) or BASELINE

    def instantiate(self) -> list[Strategy]:
        return [cls() for cls in self.strategies]


def parse_cell(text: str) -> Cell:
    """Parse ``1+2+3``, ``checkpointing+accumulation`` or ``baseline``; refuse malformed names."""
    cleaned = text.strip()
    if not cleaned:
        raise StrategyError("empty strategy name: use a number, a name or a combination like 1+2+3")
    if cleaned.lower() == BASELINE:
        return Cell(())
    tokens = cleaned.split("+")
    if any(not token.strip() for token in tokens):
        raise StrategyError(f"malformed combination '{text}': join strategies with single '+', as in 1+2+3")
    if BASELINE in (t.strip().lower() for t in tokens):
        raise StrategyError(f"'baseline' cannot be combined ('{text}'): it is the cell with no strategy")
    classes = [lookup(token) for token in tokens]
    seen: set[type[Strategy]] = set()
    for token, cls in zip(tokens, classes):
        if cls in seen:
            raise StrategyError(f"strategy '{token.strip()}' appears twice in '{text}': name each strategy once")
        seen.add(cls)
    return Cell(tuple(sorted(classes, key=lambda cls: cls.order)))


def combination_refusal(cell: Cell) -> str | None:
    """Combination stage: why the strategies of ``cell`` cannot be combined, judged from their
    hooks and their ``incompatible`` declarations alone; None when they can."""
    keys = {cls.key for cls in cell.strategies}
    for cls in cell.strategies:
        for other, why in cls.incompatible.items():
            if other in keys:
                return f"'{cls.key}' cannot run with '{other}' ({why}), so '{cell.name}' is refused: run them in separate cells"
    shared = shared_hook(cell.instantiate(), Strategy.claims)
    if shared is not None:
        first, second, hook = shared
        return f"'{first.key}' and '{second.key}' both own the {hook} hook, so '{cell.name}' is undefined: run them in separate cells"
    return None


def shared_hook(strategies: list[Strategy], claims: Callable[[Strategy], set[str]]) -> tuple[Strategy, Strategy, str] | None:
    """The first exclusive hook that two of ``strategies`` both own by ``claims``, with its two
    owners in order; None when every hook has one owner at most."""
    owners: dict[str, Strategy] = {}
    for strategy in strategies:
        for hook in sorted(claims(strategy)):
            if hook in owners:
                return owners[hook], strategy, hook
            owners[hook] = strategy
    return None
