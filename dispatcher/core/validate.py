"""The checks every layer repeats on values from outside: Python's ``bool`` is an ``int``,
and ``True`` must never pass for a count, an id or a number of seconds.

>>> is_int(3), is_int(True), is_number(2.5), is_number(False)
(True, False, True, False)
"""

from __future__ import annotations

from typing import TypeGuard


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or a ``float``, not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
