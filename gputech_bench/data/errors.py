"""The one exception type the data layer raises for problems a user can fix."""

from __future__ import annotations

from ..messages import UserError


class DataError(UserError):
    """A data problem the user caused and can fix (bad file, too few sentences, ...).

    The message is always a single line that names the problem and the fix, so the
    command-line front end can print it as-is instead of a traceback.
    """
