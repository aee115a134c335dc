"""``gputech-bench strategies`` and ``presets``: what can be run, and how the presets differ.

Both print the frames the API's ``list_strategies()`` and ``list_presets()`` return."""

from __future__ import annotations

import typer
from rich.text import Text

from ..api import list_presets, list_strategies
from ..api._catalog import STRATEGY_COLUMNS, strategies_markdown
from ..errors import ConfigError, UserError
from .common import console, fail, wrap_text

STRATEGIES_HELP = (
    "List every strategy: its number, name, what it saves and costs, its time factor in fit's cost model, where "
    "its state lives, how the estimate handles it, and which combinations are refused."
    "\n\n**Example:** `gputech-bench strategies`"
)


def refused_pairs() -> list[tuple[str, str]]:
    """Every pair of strategies the registry refuses to combine, with the reason it gives."""
    return list(list_strategies(refused=True).itertuples(index=False, name=None))


MARKDOWN_OPTION = typer.Option(False, "--markdown", help="Print docs/strategies.md's listing of every strategy's facts instead.")


def strategies_command(markdown: bool = MARKDOWN_OPTION) -> None:
    if markdown:
        # Plain print: the markdown is for a file, and rich would wrap its long table rows.
        print(strategies_markdown())
        return

    # One block per strategy, its text wrapped at word boundaries under a hanging indent:
    # seven columns of prose cannot share 80 columns without breaking every word.
    width = console.width
    fields = [column.replace("_", " ") for column in STRATEGY_COLUMNS]  # 'gives up'
    label = max(len(field) for field in fields) + 2  # 'gives up: '
    try:
        listed = list_strategies()  # imports the strategies: a user's module may fail to load
    except UserError as error:
        fail(str(error))
    console.print("[bold]strategies[/] (combine with '+', e.g. 1+2+3)", highlight=False)
    for row in listed.itertuples(index=False):
        console.print()
        heading = row.key if row.key == row.name else f"{row.key}  {row.name}"
        console.print(Text(heading, style="bold"), soft_wrap=True)
        for field, column in zip(fields, STRATEGY_COLUMNS):
            text = getattr(row, column)
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


def presets_command() -> None:
    try:
        frame = list_presets()
    except ConfigError as error:
        fail(str(error))
    for name, rows in frame.groupby("preset", sort=False):
        console.print(f"[bold]{name}[/]: {rows['description'].iloc[0]}", highlight=False)
        for row in rows.itertuples(index=False):
            if row.setting is not None:
                console.print(f"    {row.setting} = {row.value!r}  (seed: {row.seed!r})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("strategies", help=STRATEGIES_HELP)(strategies_command)
    app.command("presets", help=PRESETS_HELP)(presets_command)
