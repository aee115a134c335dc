"""The ``gputech-bench`` command line: a thin layer that parses options, calls the
library, prints and sets the exit code. Nothing below this package imports typer.

Exit codes: 0 every cell ok, 1 a cell failed (the table is printed all the same),
2 bad input (one line naming the problem and the fix), 130 interrupted.
"""

from __future__ import annotations

import signal
import sys

import typer

from .. import __version__
from ..errors import UserError
from . import catalog, estimate, report, run
from .common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, console, errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Which memory-saving strategy makes your fine-tune fit, what it saves, what it costs, and whether accuracy holds."
    "\n\n**Start here:** `gputech-bench run --matrix`",
)


def version_callback(value: bool) -> None:
    if value:
        console.print(f"gputech-bench {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """Top-level options."""


for command_group in (run, report, estimate, catalog):
    command_group.register(app)


def main() -> None:
    # Ctrl-C stops a run (its cells recorded as interrupted, exit code 130) however the command
    # was started. A shell starts a script's background commands with SIGINT ignored, Python
    # keeps an inherited "ignore", and such a run could then be stopped neither by Ctrl-C
    # nor by `kill -INT`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except UserError as error:
        # Raised outside a command's own handling: the strategy modules a user names in
        # GPUTECH_BENCH_STRATEGY_MODULES load wherever the strategies are first imported.
        errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)


__all__ = ["app", "main"]
