"""``gputech-bench strategies`` and ``presets``: what can be run, and how the presets differ."""

from __future__ import annotations

import typer
from rich.table import Table

from ..config import describe_fields, load_preset, preset_names, read_preset
from ..errors import ConfigError
from .common import console, cuda_available, fail

STRATEGIES_HELP = (
    "List every strategy: its number, name, what it saves and costs, and which combinations are refused."
    "\n\n**Example:** `gputech-bench strategies`"
)


def list_strategies() -> None:
    from itertools import combinations

    from ..strategies import Cell, refusal_reason, registered

    cuda = cuda_available()
    table = Table(title="strategies (combine with '+', e.g. 1+2+3)", title_justify="left")
    for column in ("key", "name", "saves", "costs", "gives up", "needs", "here"):
        table.add_column(column, overflow="fold")
    for cls in registered():
        here = "[red]no: needs CUDA[/]" if cls.needs_cuda and not cuda else "yes"
        table.add_row(cls.key, cls.name, cls.saves, cls.costs, cls.gives_up or "nothing", cls.requires or "-", here)
    console.print(table)
    refused = [
        (f"{a.key}+{b.key}", reason)
        for a, b in combinations(registered(), 2)
        if (reason := refusal_reason(Cell((a, b))))
    ]
    if refused:
        console.print("[bold]refused combinations[/] (both strategies own the same hook):")
        for name, reason in refused:
            console.print(f"  {name}: {reason}", highlight=False)
    else:
        console.print(
            "refused combinations: none - no two of these strategies own the same hook "
            "(placement, optimizer, batch split), so every combination is defined. "
            "A cell can still be refused by its config (see 'needs').",
            highlight=False,
        )


PRESETS_HELP = (
    "List the presets and the settings each changes from the seed's defaults.\n\n**Example:** `gputech-bench presets`"
)


def list_presets() -> None:
    defaults = {key: default for key, default, _ in describe_fields()}
    for name in preset_names():
        try:
            config = load_preset(name)
            description = read_preset(name).get("description", "")
        except ConfigError as error:
            fail(str(error))
        console.print(f"[bold]{name}[/]: {description}", highlight=False)
        for key, default in defaults.items():
            section, field_name = key.split(".")
            value = getattr(getattr(config, section), field_name)
            if value != default:
                console.print(f"    {key} = {value!r}  (seed: {default!r})", highlight=False)




def register(app: typer.Typer) -> None:
    app.command("strategies", help=STRATEGIES_HELP)(list_strategies)
    app.command("presets", help=PRESETS_HELP)(list_presets)
