"""Every error a user can fix, and how its message reaches them.

Each is a ``UserError``: its message is one line naming the problem and the fix, shown
as-is, never a traceback. They all live here so that any layer can raise them without
importing another layer. Kept free of heavy imports: a worker interrupted while torch
is still importing must still be able to classify what happened and write its result.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input or set-up. Its message is one line naming the problem
    and the fix, shown as-is: never a traceback.

    The command line prints it as ``error: ...`` (exit status 2); the Python API raises it,
    and a notebook shows the same one line (see ``_render_traceback_``).

    Example::

        >>> from gputech_bench import UserError, run_matrix
        >>> try:
        ...     run_matrix(strategies=["no-such-strategy"], preset="cpu")
        ... except UserError as error:
        ...     print(error)  # one line: the problem and the fix
    """

    def _render_traceback_(self) -> list[str]:
        # IPython (and so Jupyter) calls this instead of formatting the stack: the frames
        # inside gputech-bench say nothing the message does not, and a wall of them hides it.
        return [f"{type(self).__name__}: {self}"]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def error_line(error: BaseException) -> str:
    """The exception's type and the first line of its message ('OSError: ...'), for errors
    that are not a UserError and so need their type to be understood."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class ConfigError(UserError):
    """A configuration problem the user can fix; the message is one line."""


class DataError(UserError):
    """A data problem the user caused and can fix (bad file, too few sentences, ...).

    The message is always a single line that names the problem and the fix, so the
    command-line front end can print it as-is instead of a traceback.
    """


class ModelError(UserError):
    """A model that cannot be built or loaded; the message is one line."""


class StrategyError(UserError):
    """A strategy or combination that cannot run; the message is one line."""


class DeviceError(UserError):
    """The requested device is not usable; the message is one line."""


class SizeError(UserError):
    """A memory size that cannot be read."""


class ResultError(UserError):
    """A result file that cannot be read or does not belong to gputech-bench."""


class FitError(UserError):
    """No setup fits, or the search cannot start; one line."""


class StrategyDeclarationError(UserError):
    """A strategy class that leaves out one of the facts every strategy declares; one line naming it."""


class StrategyModuleError(UserError):
    """A module named in GPUTECH_BENCH_STRATEGY_MODULES that is missing or fails to import; one line."""
