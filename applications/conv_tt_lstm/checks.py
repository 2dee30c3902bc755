"""Argument checks shared by the application's modules (a leaf: imports nothing of ours).

Every check raises ``ValueError`` naming the argument, what was expected and what came.
"""

from __future__ import annotations

import numbers
from typing import Any, Tuple


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, unless it is not an integer ``>= minimum`` (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_ints(name: str, values: Any) -> Tuple[int, ...]:
    """``values`` as a tuple, unless it is not a non-empty sequence of positive ints."""
    if isinstance(values, (int, str, bytes)) or not hasattr(values, "__len__") \
            or len(values) == 0 or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return tuple(int(v) for v in values)
