"""``gputech-bench strategies`` and ``presets``: what can be run, and how the presets differ."""

from __future__ import annotations

import typer
from rich.text import Text

from ..config import describe_fields, load_preset, preset_names, read_preset
from ..errors import ConfigError
from .common import console, cuda_available, fail, wrap_text

STRATEGIES_HELP = (
    "List every strategy: its number, name, what it saves and costs, and which combinations are refused."
    "\n\n**Example:** `gputech-bench strategies`"
)


#: The fields of a strategy's block, in the order they are listed.
STRATEGY_FIELDS = ("saves", "costs", "gives up", "needs", "here")


def strategy_blocks(cuda: bool) -> list[tuple[str, list[tuple[str, str]]]]:
    """(heading, [(field, text)...]) for each registered strategy, numbered first."""
    from ..strategies import registered

    blocks = []
    for cls in registered():
        heading = cls.key if cls.key == cls.name else f"{cls.key}  {cls.name}"
        here = "no: needs CUDA" if cls.needs_cuda and not cuda else "yes"
        texts = (cls.saves, cls.costs, cls.gives_up or "nothing", cls.requires or "-", here)
        blocks.append((heading, list(zip(STRATEGY_FIELDS, texts))))
    return blocks


def refused_pairs() -> list[tuple[str, str]]:
    """Every pair of strategies the registry refuses to combine, with the reason it gives."""
    from itertools import combinations

    from ..strategies import Cell, combination_refusal, registered

    return [
        (f"{a.key}+{b.key}", reason)
        for a, b in combinations(registered(), 2)
        if (reason := combination_refusal(Cell((a, b))))
    ]


def list_strategies() -> None:
    # One block per strategy, its text wrapped at word boundaries under a hanging indent:
    # seven columns of prose cannot share 80 columns without breaking every word.
    width = console.width
    label = max(len(field) for field in STRATEGY_FIELDS) + 2  # 'gives up: '
    console.print("[bold]strategies[/] (combine with '+', e.g. 1+2+3)", highlight=False)
    for heading, fields in strategy_blocks(cuda_available()):
        console.print()
        console.print(Text(heading, style="bold"), soft_wrap=True)
        for field, text in fields:
            line = Text(f"   {field + ':':<{label}}") + Text(text, style="red" if text.startswith("no:") else "")
            console.print(Text("\n").join(wrap_text(line, width, indent=3 + label)), soft_wrap=True)
    console.print()
    refused = refused_pairs()
    if refused:
        console.print("[bold]refused combinations[/], each with its reason:", highlight=False)
        for name, reason in refused:
            line = Text(f"   {name}: ") + Text(reason)
            console.print(Text("\n").join(wrap_text(line, width, indent=5)), soft_wrap=True)
    else:
        console.print(
            "refused combinations: none; every pair is defined. A cell can still be refused by its config "
            "(see 'needs').",
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
