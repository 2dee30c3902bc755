"""Argument checks and plain-value configs shared by the application's modules (a leaf).

Every check raises ``ValueError`` naming the argument, what was expected and what came.
:func:`plain_fields` and :func:`from_fields` are the JSON round trip of every
configuration dataclass (architectures, sections).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Dict, Iterable, Mapping, Tuple, Type, TypeVar

T = TypeVar("T")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, unless it is not an integer ``>= minimum`` (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value``, unless it is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_positive_ints(name: str, values: Any) -> Tuple[int, ...]:
    """``values`` as a tuple, unless it is not a non-empty sequence of positive ints."""
    if isinstance(values, (int, str, bytes)) or not hasattr(values, "__len__") \
            or len(values) == 0 or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return tuple(int(v) for v in values)


def check_output_folder(name: str, path: Any) -> None:
    """Raise unless ``path`` is a folder or does not exist yet (it will be created)."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path}: is a file; give a folder (it is created if missing)")


def plain_fields(config: Any) -> Dict[str, Any]:
    """A dataclass's fields as JSON-ready plain values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_fields(kind: Type[T], values: Mapping[str, Any], what: str) -> T:
    """``kind(**values)`` for the dataclass ``kind``, unknown fields named as ``what``'s."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; expected some of {sorted(known)}")
    return kind(**dict(values))
