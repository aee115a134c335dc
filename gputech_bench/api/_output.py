"""Where the API's messages go: a line of progress for people, a warning on stderr.

The command line passes its own consoles (which never wrap a line into a pipe); a notebook
or a script gets rich consoles made when the call starts, so that rich sees the notebook
it runs in (it decides that when a console is made).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape


@dataclass
class Output:
    """The consoles an API call prints to: ``console`` for what happens, ``errors`` for warnings."""

    console: Console = field(default_factory=Console)
    errors: Console = field(default_factory=lambda: Console(stderr=True))

    def say(self, text: str) -> None:
        """One line of what is happening (rich markup)."""
        self.console.print(text, highlight=False)

    def note(self, text: str) -> None:
        """A note on stderr about how the call went (plain text: never read as markup)."""
        self.errors.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """A warning: the call goes on, and says what it could not do."""
        self.errors.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)


def output_or_default(output: Output | None) -> Output:
    return output if output is not None else Output()
