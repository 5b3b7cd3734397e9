"""Argument checks shared by the public classes: numpy integers count as integers (they come
out of every array a user indexes), booleans do not, and a refusal names the argument."""

from __future__ import annotations

import operator
from typing import Any


def integer(value: Any, argument: str) -> int:
    """``value`` as a Python int (numpy integers too), else a ``TypeError`` naming ``argument``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{argument} must be an integer, got {value!r}") from None


def int_at_least(value: Any, minimum: int, argument: str, what: str | None = None) -> int:
    """``value`` as a Python int >= ``minimum`` (numpy integers too), else a ``ValueError``
    naming ``argument`` and what it must be (``what``, default "an integer >= minimum")."""
    try:
        number = integer(value, argument)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{argument} must be {what or f'an integer >= {minimum}'}, got {value!r}")
    return number


def non_negative(value: Any, argument: str) -> int:
    """``value`` as a Python int >= 0: a ``TypeError`` naming ``argument`` when it is not an
    integer, a ``ValueError`` when it is negative."""
    number = integer(value, argument)
    if number < 0:
        raise ValueError(f"{argument} must be >= 0, got {number}")
    return number
