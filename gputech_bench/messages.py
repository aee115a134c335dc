"""Turning exceptions into the one-line messages users see.

Kept free of heavy imports: a worker interrupted while torch is still importing
must still be able to classify what happened and write its result.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input or set-up. Its message is one line naming the problem
    and the fix, shown as-is: never a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
