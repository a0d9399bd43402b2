"""The exception types of the ground floor: a mistake the user can fix.

`UserError` (a bad path, value or setting) is printed by the command line as one line `deepseekmoe: error: ...`
with exit code 2; every package may raise it, none needs the command line to do so. `UserValueError` is the one
for a bad value or setting: also a ValueError, as Python's convention for a bad argument has it, so a caller may
catch either. Other exceptions, a ValueError from inside torch or numpy included, are bugs and keep their
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class UserValueError(UserError, ValueError):
    """A value or setting the user gave is invalid: printed as one line, exit code 2."""
