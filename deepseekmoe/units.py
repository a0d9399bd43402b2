"""Byte sizes as the command line takes them: '5GB' (SI), '2GiB' (binary), '1500' (bytes), '400GB/s' (a rate)."""

from __future__ import annotations

import re
from .errors import UserValueError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float, what: str = "size") -> float:
    """'80GB' -> 8e10, '40GiB' -> 40 * 2**30, '1500' -> 1500, '400GB/s' -> 4e11 (per second); a number as is.
    ValueError (one line naming `what`) for anything else or a value that is not positive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([a-z]*)\s*", str(text).lower().removesuffix("/s"))
        if not m or m.group(2) not in _UNITS:
            raise UserValueError(f"{what} {text!r} is invalid: expected a size such as 5GB, 500MB, 40GiB or 400GB/s")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if not value > 0:
        raise UserValueError(f"{what} {text!r} must be a positive size")
    return value
