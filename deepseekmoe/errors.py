"""The one exception type of the ground floor: a mistake the user can fix.

`UserError` (a bad path, value or setting) is printed by the command line as one line `deepseekmoe: error: ...`
with exit code 2; every package may raise it, none needs the command line to do so. Other exceptions are bugs
and keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user-facing error: printed as one line, exit code 2."""
