"""``strategies`` and ``presets``: what can be run, and how the presets differ, as frames."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import describe_fields, load_preset, preset_names, read_preset
from ._setup import cuda_available

if TYPE_CHECKING:
    import pandas as pd

#: The columns of ``list_strategies()`` after key and name: each strategy's text, as the command lists it.
STRATEGY_COLUMNS = ("saves", "costs", "gives_up", "needs", "here")
PRESET_COLUMNS = ("preset", "description", "setting", "value", "seed")


def list_strategies(refused: bool = False) -> "pd.DataFrame":
    """Every registered strategy as a row, as ``gputech-bench strategies`` lists them.

    Columns: ``key`` (its number or name), ``name``, ``saves``, ``costs``, ``gives_up``,
    ``needs`` (what it requires) and ``here`` (``yes``, or why it cannot run on this machine,
    such as ``no: needs CUDA``). With ``refused=True``: every pair of strategies that cannot be
    combined instead, as ``combination`` and the ``reason`` the registry gives.

    Example::

        >>> from gputech_bench import list_strategies
        >>> list_strategies()[["key", "name", "saves"]]
        >>> list_strategies(refused=True)      # e.g. 4+amp: both own the precision hook
    """
    import pandas as pd

    if refused:
        from itertools import combinations

        from ..strategies import Cell, combination_refusal, registered

        pairs = [(f"{a.key}+{b.key}", reason) for a, b in combinations(registered(), 2)
                 if (reason := combination_refusal(Cell((a, b))))]
        return pd.DataFrame(pairs, columns=["combination", "reason"])

    from ..strategies import registered
    cuda = cuda_available()
    rows = []
    for cls in registered():
        here = "no: needs CUDA" if cls.needs_cuda and not cuda else "yes"
        rows.append((cls.key, cls.name, cls.saves, cls.costs, cls.gives_up or "nothing", cls.requires or "-", here))
    return pd.DataFrame(rows, columns=["key", "name", *STRATEGY_COLUMNS])


def list_presets() -> "pd.DataFrame":
    """Each preset and the settings it changes from the seed's defaults, as
    ``gputech-bench presets`` lists them: one row per changed setting with ``preset``,
    ``description``, ``setting``, ``value`` and ``seed`` (the seed's default). A preset that
    changes nothing (``seed`` itself) is one row whose setting, value and seed are empty.

    Example::

        >>> from gputech_bench import list_presets
        >>> list_presets()
        >>> list_presets().query("preset == 'cpu'")[["setting", "value", "seed"]]
    """
    import pandas as pd

    defaults = {key: default for key, default, _ in describe_fields()}
    rows = []
    for name in preset_names():
        config = load_preset(name)
        description = read_preset(name).get("description", "")
        changed: list[tuple[str, Any, str | None, Any, Any]] = []  # (preset, description, setting, value, default)
        for key, default in defaults.items():
            section, field_name = key.split(".")
            value = getattr(getattr(config, section), field_name)
            if value != default:
                changed.append((name, description, key, value, default))
        rows += changed or [(name, description, None, None, None)]
    # object columns: a setting's value keeps its own type (149798 stays an int, 3e-05 a float).
    return pd.DataFrame(rows, columns=list(PRESET_COLUMNS), dtype=object)


__all__ = ["list_presets", "list_strategies"]
