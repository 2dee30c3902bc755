"""Argument and finiteness checks shared by every module (a leaf: imports nothing of tt_conv).

Each check raises an exception that names the argument, what was expected and what came.
"""

from __future__ import annotations

import math

import torch

#: The factorizations every layer, rank rule and decomposition knows.
FACTORIZATIONS = ("cp", "tucker", "tt")


def check_factorization(factorization: str) -> str:
    """Return ``factorization`` lower-cased, or raise naming the accepted values."""
    if not isinstance(factorization, str) or factorization.lower() not in FACTORIZATIONS:
        raise ValueError(
            f"factorization must be one of {', '.join(map(repr, FACTORIZATIONS))}, "
            f"got {factorization!r}"
        )
    return factorization.lower()


def check_fraction(value, name: str, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """Return ``value`` if it is a number in (0, 1] (or [0, 1] / (0, 1) as asked), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    high_ok = value <= 1 if allow_one else value < 1
    if not (low_ok and high_ok):
        interval = ("[0" if allow_zero else "(0") + ", " + ("1]" if allow_one else "1)")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_min_rank(min_rank) -> int:
    """Return ``min_rank`` if it is a positive int, else raise."""
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be a positive int, got {min_rank!r}")
    return min_rank


def check_multiple_of(multiple_of, argument: str = "multiple_of"):
    """Return ``multiple_of`` if it is ``"auto"`` or a positive int, else raise naming
    ``argument``."""
    if multiple_of == "auto":
        return multiple_of
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(
            f"{argument} must be 'auto' or a positive int (1: ranks as they are), got "
            f"{multiple_of!r}")
    return multiple_of


def check_rank_value(rank) -> None:
    """Raise unless ``rank`` is a positive int, a tuple of positive ints or a float in (0, 1]."""
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int, a tuple of ints or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0) or math.isnan(rank):
            raise ValueError(
                f"rank as a float is the fraction of the dense kernel's parameters to keep and "
                f"must be in (0, 1], got {rank!r}"
            )
    elif isinstance(rank, int):
        if rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
    else:
        try:
            values = tuple(rank)
        except TypeError:
            raise TypeError(
                f"rank must be an int, a tuple of ints or a float in (0, 1], got {rank!r}"
            ) from None
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"rank as a tuple must hold ints, got {rank!r}")
        if any(v <= 0 for v in values):
            raise ValueError(f"every rank must be positive, got {rank!r}")


def check_finite(tensor: torch.Tensor, name: str = "kernel") -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or inf, naming ``name``."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf values; cannot decompose it")
