"""Checks of configuration values: each raises a ValueError or TypeError that names the setting and
the offending value. Plain Python, no torch, so that command-line parsers can use them."""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """An int (not a bool) in [minimum, maximum] where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> None:
    """A finite int or float, >= minimum (or > 0 when positive) where asked."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_probability(name: str, value: Any, *, zero: bool = True, one: bool = False) -> None:
    """A number in [0, 1], without 0 unless `zero` and without 1 unless `one`."""
    low, high = "[" if zero else "(", "]" if one else ")"
    if not _is_number(value) or not (
        (0.0 < value or (zero and value == 0.0)) and (value < 1.0 or (one and value == 1.0))
    ):
        raise ValueError(f"{name} must be a probability in {low}0, 1{high}, got {value!r}")
